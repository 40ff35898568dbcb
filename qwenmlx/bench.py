"""`qwenmlx bench`: qwenmlx against mlx-lm on the same weights, in one run.

Both sides read the same synthetic checkpoints: Qwen3-30B-A3B's real per-layer shapes (hidden
2048, 32/4 heads of 128, 128 experts of 768 with top-8, vocab 151936) with fewer layers and random
weights, written once in Hugging Face's layout and quantized by `qwenmlx convert` with the
experts-4 / experts-6 recipes into mlx-lm's layout, which `mlx_lm.load` reads as it is.

Every measurement of a model runs in a child process of its own (`python -m qwenmlx.bench TASK`),
so the peak memory is that side's alone; the sides alternate, and each repeat swaps which goes
first, to spread the noise of a shared machine over both. Needs mlx-lm (the dev extra) and a
source checkout (the real config is tests/fixtures/config-Qwen3-30B-A3B.json).
"""

import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .destinations import (
    check_output_file,
    check_replaceable,
    mark_written,
    new_directory,
    prepare_directory,
    remove_output,
    resolve,
)
from .errors import QwenMLXError

ROOT = Path(__file__).resolve().parent.parent
REAL_CONFIG = ROOT / "tests/fixtures/config-Qwen3-30B-A3B.json"
SHARD_BYTES = 2 * 10**9
SIDES = ("qwenmlx", "mlx-lm")
CACHE_KINDS = ("growing", "rotating", "8-bit")
EXPERT_BITS = (4, 6)  # the recipes experts-4 and experts-6
# Primitives that only re-describe memory (no kernel runs for them on any backend).
VIEWS = {"Broadcast", "Reshape", "ExpandDims", "Squeeze", "Slice", "Transpose", "StopGradient", "AsStrided"}


@dataclass
class BenchOptions:
    layers: int = 2
    prompt_tokens: int = 512
    decode_tokens: int = 128
    bits: tuple[int, ...] = (4, 6)
    repeats: int = 2
    contexts: tuple[int, ...] = (8192, 32768)
    context_steps: int = 8
    dtype: str = "float32"  # both sides compute in it; CPU MLX emulates bf16 (~8x slower)
    config: Path = REAL_CONFIG  # whose per-layer shapes the synthetic model has
    bandwidth_gb: float = 2.0  # size of the array summed to measure read bandwidth
    default_dtypes: bool = True  # also mlx-lm at its own default (the checkpoint's bf16)
    threads: int | None = None  # qwenmlx's CPU cores (default: all); mlx-lm runs each matmul on one
    convert: bool = True
    workdir: Path = Path(tempfile.gettempdir()) / "qwenmlx-bench"


QUICK = dict(prompt_tokens=32, decode_tokens=16, bits=(4,), repeats=2, contexts=(8192,), context_steps=4,
             default_dtypes=False, convert=False)


# --- the synthetic checkpoints ---

def hf_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen3-MoE checkpoint in Hugging Face's layout (one tensor per expert)."""
    h, heads, kv, d = (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
                       config["head_dim"])
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (heads * d, h), f"{p}.self_attn.k_proj.weight": (kv * d, h),
            f"{p}.self_attn.v_proj.weight": (kv * d, h), f"{p}.self_attn.o_proj.weight": (h, heads * d),
            f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,),
            f"{p}.mlp.gate.weight": (config["num_experts"], h),
        })
        m = config["moe_intermediate_size"]
        for e in range(config["num_experts"]):
            shapes[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (m, h)
            shapes[f"{p}.mlp.experts.{e}.up_proj.weight"] = (m, h)
            shapes[f"{p}.mlp.experts.{e}.down_proj.weight"] = (h, m)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (config["vocab_size"], h)
    return shapes


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    """Normal(0, 0.02) values as bf16 bytes (the top half of each float32)."""
    values = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
    return (values >> 16).astype(np.uint16).tobytes()


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        n_bytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            f.write(random_bf16(shape, rng))


def write_stub_tokenizer(dst: Path) -> None:
    """A two-token tokenizer: mlx_lm.convert insists on loading one, and the benchmarks feed token ids."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "<|im_end|>": 1}, unk_token="<unk>")).save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "unk_token": "<unk>"}))


def bench_config(path: Path, layers: int) -> dict:
    """The config.json at path with `layers` layers."""
    if not path.is_file():
        hint = "; the default is in a source checkout's tests/fixtures" if path == REAL_CONFIG else ""
        raise QwenMLXError(f"{path}: no such config file{hint}")
    try:
        return {**json.loads(path.read_text()), "num_hidden_layers": layers}
    except json.JSONDecodeError as e:
        raise QwenMLXError(f"{path}: not valid JSON ({e})") from None


def write_synthetic_checkpoint(dst: Path, config: dict) -> None:
    """A bf16 Hugging Face checkpoint of random weights with the config's shapes, in 2 GB shards."""
    shards, size = [{}], 0
    for name, shape in hf_tensor_shapes(config).items():
        n_bytes = 2 * int(np.prod(shape))
        if size + n_bytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n_bytes
    rng = np.random.default_rng(0)
    weight_map = {}
    with new_directory(prepare_directory(dst)) as tmp:
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_shard(tmp / name, shard, rng)
            weight_map.update(dict.fromkeys(shard, name))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_stub_tokenizer(tmp)


def synthetic_checkpoints(options: BenchOptions) -> tuple[Path, dict[int, Path]]:
    """The bf16 HF checkpoint and one MLX checkpoint per experts' bit width, written once and reused."""
    from quantize import get_recipe

    from .convert import convert

    config = bench_config(options.config, options.layers)
    tag = f"{options.layers}l-{hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]}"
    hf = options.workdir / f"hf-bf16-{tag}"
    if not hf.exists():
        write_synthetic_checkpoint(hf, config)
    quantized = {}
    for bits in options.bits:
        quantized[bits] = options.workdir / f"experts-{bits}-{tag}"
        if not quantized[bits].exists():
            convert(hf, quantized[bits], get_recipe(f"experts-{bits}"))
    return hf, quantized


# --- the two sides, behind the same few operations (run in the child processes) ---

class QwenMLXSide:
    @staticmethod
    def load(path: str, dtype, threads: int | None):
        from .checkpoint import load_model

        return load_model(path, dtype=dtype, threads=threads)[0]

    @staticmethod
    def generate(model, prompt: list[int], max_tokens: int, cache: list):
        from .generate import generate_tokens

        return generate_tokens(model, prompt, cache=cache, max_tokens=max_tokens)

    @staticmethod
    def make_cache(model, kind: str, max_size: int) -> list:
        from .cache import make_cache

        return make_cache(model, max_kv_size=max_size if kind == "rotating" else None,
                          kv_bits=8 if kind == "8-bit" else None)

    @staticmethod
    def fill(cache, keys, values) -> None:
        # The cache's own storage path (what attend does), without attending over the whole context.
        cache.store(keys, values)

    @staticmethod
    def kernels(model, cache: list) -> dict:
        """Counted with each matmul whole, as on a GPU (what carries over to a Mac); cpu_total with the CPU's split."""
        from .cpu_streams import NO_CORES

        cores = model.cores
        cpu = decode_step_kernels(model, cache)
        model.use_cores(NO_CORES)
        try:
            return {**decode_step_kernels(model, cache), "cpu_total": cpu["total"]}
        finally:
            model.use_cores(cores)


class MLXLMSide:
    @staticmethod
    def load(path: str, dtype, threads: int | None):
        """mlx_lm.load without the tokenizer (the benchmark feeds token ids); dtype None keeps the checkpoint's."""
        import mlx.core as mx
        from mlx_lm.utils import load_model

        model = load_model(Path(path))[0]
        if dtype is not None:
            model.set_dtype(dtype)
            mx.eval(model.parameters())
        return model

    @staticmethod
    def generate(model, prompt: list[int], max_tokens: int, cache: list):
        """The loop under mlx_lm.stream_generate (greedy), without detokenizing."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        return generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=cache)

    @staticmethod
    def make_cache(model, kind: str, max_size: int) -> list:
        from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

        from .cache import kv_group_size

        if kind == "8-bit":  # the group qwenmlx picks (64 for head_dim 128, mlx-lm's default)
            return [QuantizedKVCache(group_size=kv_group_size(model.args.head_dim), bits=8) for _ in model.layers]
        return make_prompt_cache(model, max_kv_size=max_size if kind == "rotating" else None)

    @staticmethod
    def fill(cache, keys, values) -> None:
        cache.update_and_fetch(keys, values)

    @staticmethod
    def kernels(model, cache: list) -> dict:
        counts = decode_step_kernels(model, cache)
        return {**counts, "cpu_total": counts["total"]}


SIDE_CLASSES = {"qwenmlx": QwenMLXSide, "mlx-lm": MLXLMSide}


def vm_hwm_gb() -> float:
    """This process's peak resident set size, from /proc (0 where there is no /proc)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / 1e9


def count_kernels(outputs) -> Counter:
    """Kernel-launching primitives in the graph that computes outputs, by name (views left out)."""
    import mlx.core as mx

    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, outputs)
        labels = re.findall(r'\[label ="(\w+)", shape=rectangle\]', Path(f.name).read_text())
    return Counter(name for name in labels if name not in VIEWS)


def decode_step_kernels(model, cache: list) -> dict:
    """One decode step's kernels over a warm cache; per layer = (step - embedding, final norm, lm_head) / layers.

    The step is then run and taken back out of the cache, so the next count starts from the same cache.
    """
    import mlx.core as mx

    token = mx.array([[5]])
    logits = model(token, cache)
    step = count_kernels(logits)
    mx.eval(logits, [c.state for c in cache])
    for c in cache:
        c.trim(1)
    head = count_kernels(model.lm_head(model.model.norm(model.model.embed_tokens(token))))
    layers = len(model.layers)
    return {"total": sum(step.values()), "head": sum(head.values()),
            "per_layer": (sum(step.values()) - sum(head.values())) / layers, "distinct": len(step),
            "by_primitive": dict(step.most_common())}


def bytes_per_token(model, top_k: int) -> dict:
    """Bytes of weights one decoded token reads: all of attention, router, norms, lm_head; top_k experts; one embedding row."""
    from mlx.utils import tree_flatten

    total = experts = 0
    for name, array in tree_flatten(model.parameters()):
        if ".switch_mlp." in name:
            share = top_k / array.shape[0]
            experts += array.nbytes * share
        elif "embed_tokens" in name:
            share = 1 / array.shape[0]
        else:
            share = 1
        total += array.nbytes * share
    return {"bytes_per_token": int(total), "expert_bytes_per_token": int(experts)}


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(i * 7919 + 13) % vocab for i in range(n)]


def run_generation(side, model, task: dict) -> dict:
    """Prefill and decode through the side's generation loop, timed the same way for both sides."""
    import mlx.core as mx

    cache = side.make_cache(model, "growing", 0)
    prompt = prompt_ids(task["prompt_tokens"], task["vocab"])
    mx.reset_peak_memory()
    start = time.perf_counter()
    n = 0
    for _ in side.generate(model, prompt, task["decode_tokens"], cache):
        n += 1
        if n == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"prefill_tps": len(prompt) / (first - start), "decode_tps": (n - 1) / (end - first),
            "generated": n, "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "kernels": side.kernels(model, cache)}


def run_long_context(side, model, task: dict) -> list[dict]:
    """Decode over caches filled directly with random keys/values (no prefill: 32K tokens take hours on a CPU)."""
    import mlx.core as mx

    rows = []
    dtype = model.model.norm.weight.dtype
    for context in task["contexts"]:
        held = context - task["context_steps"] - 1  # the rotating cache's window is full at the last step
        shape = (1, task["kv_heads"], held, task["head_dim"])
        keys, values = mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype)
        for kind in CACHE_KINDS:
            cache = side.make_cache(model, kind, context)
            for c in cache:
                side.fill(c, keys, values)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
            mx.reset_peak_memory()
            token = mx.array([[5]])
            mx.eval(model(token, cache))  # warm-up
            start = time.perf_counter()
            for _ in range(task["context_steps"]):
                mx.eval(model(token, cache))
            seconds = (time.perf_counter() - start) / task["context_steps"]
            rows.append({"context": context, "cache": kind, "decode_tps": 1 / seconds,
                         "cache_gb": sum(c.nbytes for c in cache) / 1e9, "peak_memory_gb": mx.get_peak_memory() / 1e9})
            del cache
            mx.clear_cache()
    return rows


def read_bandwidth_gbps(gigabytes: float, repeats: int = 5) -> float:
    """MLX's read bandwidth on this machine: the best of a few sums over a large float32 array."""
    import mlx.core as mx

    x = mx.random.uniform(shape=(int(gigabytes * 1e9 / 4),))
    mx.eval(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(x.sum())
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def child(task: dict) -> dict:
    """One measurement in this (child) process; see run_child."""
    import mlx.core as mx

    if task["kind"] == "bandwidth":
        return {"read_gbps": read_bandwidth_gbps(task["gigabytes"])}
    if task["kind"] == "memory-budget":
        from .bench_budget import measure

        return measure(task)
    side = SIDE_CLASSES[task["side"]]
    start = time.perf_counter()
    model = side.load(task["model"], getattr(mx, task["dtype"]) if task["dtype"] else None, task["threads"])
    result = {"load_s": time.perf_counter() - start}
    if task["kind"] == "generate":
        result.update(run_generation(side, model, task))
        result.update(bytes_per_token(model, task["top_k"]))
    else:
        result["rows"] = run_long_context(side, model, task)
    result["peak_rss_gb"] = vm_hwm_gb()
    return result


def run_child(task: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "qwenmlx.bench", json.dumps(task)], capture_output=True,
                            text=True, cwd=ROOT, env=env)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise QwenMLXError(f"bench: {task['kind']} on {task.get('side', '-')} failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- conversion: peak RSS and time of the two converters, each in a child measured by GNU time ---

def measure_command(command: list[str]) -> dict:
    """Peak RSS (GB) and wall time (s) of a child process, from /usr/bin/time -v; and what it printed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's qwenmlx, whatever is installed
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        said = [line for line in result.stderr.split("\tCommand being timed")[0].strip().splitlines()
                if not line.startswith("Command exited with non-zero status")] or ["(nothing on stderr)"]
        raise QwenMLXError(f"bench: {' '.join(command[:4])} failed: {said[-1]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return {"peak_rss_gb": rss_kb * 1024 / 1e9, "wall_s": seconds, "stdout": result.stdout}


def same_tensors(a: Path, b: Path) -> bool:
    import mlx.core as mx

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(mx.load(str(f)))
        return out

    ours, theirs = tensors(a), tensors(b)
    return set(ours) == set(theirs) and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def conversion_commands(src: Path, dst: Path) -> dict[str, list[str]]:
    """Recipe q4 g64 on both sides (router at 8 bits: mlx-lm's default for Qwen3-MoE)."""
    python = sys.executable
    return {
        "qwenmlx": [python, "-m", "qwenmlx", "convert", str(src), str(dst), "--recipe", "q4", "--json"],
        "mlx-lm": [python, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(dst),
                   "-q", "--q-bits", "4", "--q-group-size", "64", "--dtype", "bfloat16"],
    }


# --- the whole run ---

def machine() -> dict:
    """What the figures were taken on; the load average shows how much the shared cores were busy."""
    from importlib.metadata import version

    import mlx.core as mx

    cpuinfo = Path("/proc/cpuinfo")
    cpu = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    return {"cpu": cpu.group(1) if cpu else platform.processor(), "cores": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "os": platform.platform(), "device": str(mx.default_device()), "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"), "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


Step = tuple[str, Callable[[], dict]]  # a label, and a run returning {"bandwidth"|"run"|"conversion": ...}


def variants(options: BenchOptions) -> list[tuple[str, str | None]]:
    """(side, dtype) pairs to run: both sides at the same dtype, and mlx-lm at its default (None: the checkpoint's)."""
    out = [(side, options.dtype) for side in SIDES]
    return out + [("mlx-lm", None)] if options.default_dtypes else out


def plan_steps(options: BenchOptions, config: dict, hf: Path, checkpoints: dict[int, Path]) -> list[Step]:
    """The child runs in order: per repeat, the sides alternate and swap which goes first."""
    steps: list[Step] = [("read bandwidth", lambda: {"bandwidth": run_child(
        {"kind": "bandwidth", "gigabytes": options.bandwidth_gb})})]
    pairs = variants(options)
    for repeat in range(options.repeats):
        order = pairs if repeat % 2 == 0 else pairs[1::-1] + pairs[2:]
        for bits, path in checkpoints.items():
            for kind in ("generate", "context") if options.contexts else ("generate",):
                for side, dtype in order:
                    if kind == "context" and dtype != options.dtype:
                        continue
                    task = {"kind": kind, "side": side, "dtype": dtype, "model": str(path), "bits": bits,
                            "prompt_tokens": options.prompt_tokens, "decode_tokens": options.decode_tokens,
                            "vocab": config["vocab_size"], "top_k": config["num_experts_per_tok"],
                            "kv_heads": config["num_key_value_heads"], "head_dim": config["head_dim"],
                            "contexts": list(options.contexts), "context_steps": options.context_steps,
                            "threads": options.threads}
                    steps.append((f"{kind}, {bits}-bit experts, {side} ({dtype or 'default dtype'}), "
                                  f"repeat {repeat + 1}", lambda task=task: {"run": {**task, **run_child(task)}}))
    for repeat in range(options.repeats if options.convert else 0):
        for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
            def convert_once(side=side):
                dst = options.workdir / f"converted-{side}"
                remove_output(dst)  # the last run's: the converters write only into a new directory
                try:
                    return {"conversion": {"side": side, **measure_command(conversion_commands(hf, dst)[side])}}
                finally:
                    if dst.is_dir():  # mlx-lm writes no manifest: the next run's remove_output needs one
                        mark_written(dst)

            steps.append((f"convert, {side}, repeat {repeat + 1}", convert_once))
    return steps


def summarise(options: BenchOptions, outputs: list[dict]) -> dict:
    """Medians over the repeats, per bit width and side, with the bandwidth bound and the targets."""
    bandwidth = next(o["bandwidth"]["read_gbps"] for o in outputs if "bandwidth" in o)
    runs = [o["run"] for o in outputs if "run" in o]
    conversions = [o["conversion"] for o in outputs if "conversion" in o]
    result = {"options": {**asdict(options), "workdir": str(options.workdir), "config": str(options.config)},
              "read_bandwidth_gbps": bandwidth, "generation": [], "long_context": [], "conversion": None,
              "notes": NOTES}
    for bits in options.bits:
        for side, dtype in variants(options):
            mine = [r for r in runs if r["bits"] == bits and r["side"] == side and r["dtype"] == dtype]
            gen = [r for r in mine if r["kind"] == "generate"]
            row = {"bits": bits, "side": side, "dtype": dtype or "bfloat16 (default)", "runs": len(gen)}
            for key in ("decode_tps", "prefill_tps", "load_s", "peak_rss_gb", "peak_memory_gb"):
                row[key] = median_of(gen, key)
            for key in ("decode_tps", "prefill_tps"):  # each run's figure, to judge the noise
                row[f"{key}_runs"] = [r[key] for r in gen]
            row["bytes_per_token"] = gen[0]["bytes_per_token"]
            row["bound_tps"] = bandwidth * 1e9 / row["bytes_per_token"]
            row["fraction_of_bound"] = row["decode_tps"] / row["bound_tps"]
            row["kernels"] = gen[0]["kernels"]
            result["generation"].append(row)
            cells = [cell for r in mine if r["kind"] == "context" for cell in r["rows"]]
            for context in options.contexts:
                for kind in CACHE_KINDS:
                    same = [c for c in cells if c["context"] == context and c["cache"] == kind]
                    if same:
                        result["long_context"].append({
                            "bits": bits, "side": side, "context": context, "cache": kind,
                            **{k: median_of(same, k) for k in ("decode_tps", "cache_gb", "peak_memory_gb")}})
    if conversions:
        result["conversion"] = {side: {k: median_of([c for c in conversions if c["side"] == side], k)
                                       for k in ("peak_rss_gb", "wall_s")} for side in SIDES}
        result["conversion"]["identical_outputs"] = same_tensors(options.workdir / "converted-qwenmlx",
                                                                 options.workdir / "converted-mlx-lm")
    result["targets"] = targets(result)
    return result


def check_options(o: BenchOptions) -> None:
    """Bad sizes fail here, in one line, before minutes of checkpoint writing."""
    for name, value, least in (("--layers", o.layers, 1), ("--prompt-tokens", o.prompt_tokens, 1),
                               ("--decode-tokens", o.decode_tokens, 2), ("--repeats", o.repeats, 1),
                               ("--context-steps", o.context_steps, 1),
                               ("--threads", 1 if o.threads is None else o.threads, 1)):
        if value < least:
            raise QwenMLXError(f"{name} must be at least {least}, got {value}")
    if not o.bits or any(b not in EXPERT_BITS for b in o.bits):
        raise QwenMLXError(f"--bits: experts' bit widths are {', '.join(map(str, EXPERT_BITS))}, got {o.bits}")
    if any(c <= o.context_steps + 1 for c in o.contexts):
        raise QwenMLXError(f"--contexts must exceed --context-steps + 1, got {o.contexts}")


def is_bench_result(path: Path) -> bool:
    """Whether path holds what an earlier run wrote to -o (so a rerun may replace it)."""
    try:
        if path.stat().st_size > 10**7:
            return False
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and {"machine", "options"} <= result.keys() and \
        bool({"generation", "memory_budget"} & result.keys())


def check_results_file(path: str | Path, config: Path) -> Path:
    """-o/--output, checked before minutes of work: never the --config file, an existing file only if it is an
    earlier result (a rerun refreshes bench.json, and nothing else is overwritten)."""
    return check_output_file(path, inputs={"--config file": config}, force=is_bench_result(resolve(path)),
                             if_exists="it is not an earlier bench result, so choose another --output")


def check_workdir(options: BenchOptions) -> None:
    """What the run will write into --workdir: refused now, not after minutes of work, if it cannot."""
    if options.workdir.exists() and not options.workdir.is_dir():
        raise QwenMLXError(f"{options.workdir}: --workdir is not a directory")
    for side in SIDES if options.convert else ():
        check_replaceable(resolve(options.workdir / f"converted-{side}"))


def run_bench(options: BenchOptions, on_step: Callable[[str, int, int], None] = lambda *_: None) -> dict:
    """Measure everything the options ask for; on_step(label, done, total) reports progress. Returns plain data."""
    check_options(options)
    check_workdir(options)
    if options.convert and shutil.which("/usr/bin/time") is None:
        raise QwenMLXError("bench: the conversion benchmark needs GNU time (/usr/bin/time); pass --no-convert")
    options.workdir.mkdir(parents=True, exist_ok=True)
    config = bench_config(options.config, options.layers)
    facts = machine()
    on_step("writing the synthetic checkpoints (once per size)", 0, 1)
    hf, checkpoints = synthetic_checkpoints(options)
    steps = plan_steps(options, config, hf, checkpoints)
    outputs = []
    for done, (label, run) in enumerate(steps):
        on_step(label, done, len(steps))
        outputs.append(run())
    on_step("done", len(steps), len(steps))
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"machine": facts, **summarise(options, outputs)}


NOTES = [
    "Decode and prefill: each side's own generation loop (qwenmlx generate_tokens, mlx-lm generate_step, "
    "greedy, no detokenizer), timed identically: prefill until the first token, decode over the rest.",
    "Kernels: primitives in the graph of one decode step's logits over a warm cache, from mx.export_to_dot, "
    f"views left out ({', '.join(sorted(VIEWS))}). On the CPU, mx.fast.rms_norm/rope/sdpa appear as their "
    "decomposed fallbacks, so these counts are higher than on Metal; 'distinct' is the number of primitive kinds. "
    "Counted with each matmul whole, as on a GPU; 'with the CPU split' is the graph run here.",
    "Threads: on the CPU qwenmlx splits each large matmul (by output rows; the experts by token-expert pairs) "
    "over one stream per core, as MLX runs each matmul on a single thread; mlx-lm runs them one at a time.",
    "Long context: caches filled directly with random keys/values through each cache's write path "
    "(no prefill), then single-token decode steps timed; the rotating cache's window is the context length.",
    "Bandwidth bound: bytes of weights one token reads (attention, router, norms, lm_head, top-8 experts, "
    "one embedding row, at the dtype in memory) over MLX's measured read bandwidth (sum over 2 GB).",
]


def targets(result: dict) -> dict:
    """The issue's targets as ratios qwenmlx / mlx-lm at the same dtype, per bit width."""
    out = {}
    for bits in {r["bits"] for r in result["generation"]}:
        ours, theirs = (next(r for r in result["generation"] if r["bits"] == bits and r["side"] == s
                             and r["dtype"] == result["options"]["dtype"]) for s in SIDES)
        out[f"{bits}-bit"] = {
            "decode_ratio": ours["decode_tps"] / theirs["decode_tps"], "decode_target": 1.1,
            "prefill_ratio": ours["prefill_tps"] / theirs["prefill_tps"], "prefill_target": 1.0,
            "kernel_ratio": ours["kernels"]["total"] / theirs["kernels"]["total"], "kernel_target": 0.7,
        }
    if result["conversion"]:
        c = result["conversion"]
        out["conversion"] = {"peak_rss_ratio": c["qwenmlx"]["peak_rss_gb"] / c["mlx-lm"]["peak_rss_gb"],
                             "peak_rss_target": 0.5}
    return out



# --- what a person reads ---

def result_tables(result: dict, markdown: bool = False) -> list:
    """Rich tables of a run_bench result; with markdown, boxes drawn as Markdown tables (for the README)."""
    from rich import box
    from rich.table import Table

    style = box.MARKDOWN if markdown else box.HEAVY_HEAD
    o = result["options"]

    def table(title: str, columns: list[str], labels: int = 3) -> Table:
        """The first `labels` columns name the row, the rest are figures."""
        t = Table(title=title, box=style, title_justify="left")
        for i, column in enumerate(columns):
            t.add_column(column, justify="left" if i < labels else "right")
        return t

    gen = table(f"Generation: {o['layers']} layers shaped as {Path(o['config']).name}, {o['prompt_tokens']}-token prompt, "
                f"{o['decode_tokens']} decoded, median of {o['repeats']}; read bandwidth "
                f"{result['read_bandwidth_gbps']:.1f} GB/s",
                ["experts", "side", "dtype", "decode tok/s", "prefill tok/s", "load (s)", "peak RSS (GB)",
                 "MLX peak (GB)", "MB read/token", "bound tok/s", "of bound"])
    kernels = table("Kernels per decoded token (views left out; CPU: fast ops as their fallbacks; "
                    "matmuls whole, as on a GPU)",
                    ["experts", "side", "dtype", "total", "per layer", "embed+norm+lm_head", "distinct",
                     "with the CPU split"])
    for r in result["generation"]:
        gen.add_row(f"{r['bits']}-bit", r["side"], r["dtype"], f"{r['decode_tps']:.2f}", f"{r['prefill_tps']:.2f}",
                    f"{r['load_s']:.1f}", f"{r['peak_rss_gb']:.2f}", f"{r['peak_memory_gb']:.2f}",
                    f"{r['bytes_per_token'] / 1e6:.0f}", f"{r['bound_tps']:.1f}", f"{r['fraction_of_bound']:.0%}")
        k = r["kernels"]
        kernels.add_row(f"{r['bits']}-bit", r["side"], r["dtype"], str(k["total"]), f"{k['per_layer']:.1f}",
                        str(k["head"]), str(k["distinct"]), str(k["cpu_total"]))
    out = [gen, kernels]
    if result["long_context"]:
        lc = table(f"Long context: caches filled with random keys/values, {o['context_steps']} decode steps timed",
                   ["experts", "context", "cache", "qwenmlx tok/s", "mlx-lm tok/s", "qwenmlx cache (GB)",
                    "mlx-lm cache (GB)", "qwenmlx peak (GB)", "mlx-lm peak (GB)"])
        rows = result["long_context"]
        for r in (r for r in rows if r["side"] == "qwenmlx"):
            theirs = next(t for t in rows if t["side"] == "mlx-lm" and
                          (t["bits"], t["context"], t["cache"]) == (r["bits"], r["context"], r["cache"]))
            lc.add_row(f"{r['bits']}-bit", str(r["context"]), r["cache"], f"{r['decode_tps']:.2f}",
                       f"{theirs['decode_tps']:.2f}", f"{r['cache_gb']:.3f}", f"{theirs['cache_gb']:.3f}",
                       f"{r['peak_memory_gb']:.2f}", f"{theirs['peak_memory_gb']:.2f}")
        out.append(lc)
    if result["conversion"]:
        c = result["conversion"]
        conv = table(f"Conversion, bf16 → q4 g64 (outputs identical: {c['identical_outputs']})",
                     ["side", "peak RSS (GB)", "wall (s)"], labels=1)
        for side in SIDES:
            conv.add_row(side, f"{c[side]['peak_rss_gb']:.2f}", f"{c[side]['wall_s']:.1f}")
        out.append(conv)
    tg = table("Targets (qwenmlx / mlx-lm, same dtype)", ["what", "measure", "ratio", "target", "met"], labels=2)
    for what, t in result["targets"].items():
        for name, sense in (("decode", 1), ("prefill", 1), ("kernel", -1), ("peak_rss", -1)):
            if f"{name}_ratio" in t:
                ratio, target = t[f"{name}_ratio"], t[f"{name}_target"]
                met = ratio >= target if sense > 0 else ratio <= target
                tg.add_row(what, name.replace("_", " "), f"{ratio:.2f}",
                           f"{'≥' if sense > 0 else '≤'} {target}", "yes" if met else "no")
    out.append(tg)
    return out


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
