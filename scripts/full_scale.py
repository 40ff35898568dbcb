"""Qwen3-30B-A3B at its real size on this machine, with synthetic weights: pull, load, generate, chat, summarise.

    python scripts/full_scale.py               # all 48 layers: 61 GB served, 18 GB written, ~2 h 20 min on 2 cores
    python scripts/full_scale.py --layers 2    # the same path at 2 layers, in a few minutes

1. A mock of the Hub (tests/mock_hub.py) on 127.0.0.1 serves `Qwen/Qwen3-30B-A3B` with the real model's config
   (the first --layers of its 48 layers), laid out as the Hub has it (~4 GB shards and an index, Qwen's
   tokenizer), with random bf16 weights generated as they are read (tests/synthetic_checkpoint.py): the
   61 GB never touch the disk.
2. `qwenmlx pull` (experts-4) from it, in a child process under GNU time: wall time and peak RSS; the disk
   under the workdir is sampled every second for the peak, against the output + 2 input shards.
3.-4. qwenmlx.load and mlx_lm.load, each in a child process of its own: load time and peak RSS; then 32 tokens
   generated greedily after a 256-token prompt (prefill and decode tok/s, MLX peak). Both sides compute in
   qwenmlx's dtype (float32 on a CPU, bf16 on a GPU; mlx-lm's weights are cast a layer at a time), and must
   give the same tokens.
5. One chat turn through ChatSession (in qwenmlx's child), and `qwenmlx summarize --json` of a 3,000-token
   document (the bundled articles), in a child under GNU time.

The figures come out as Markdown tables (or --json) and in full_scale.json in the workdir, saved after each step.
The pulled model stays in the workdir. A second run with the same workdir and --layers skips the pull, and keeps
every figure already measured with the same settings (at 48 layers this CPU prefills under a token a second, so
each step is long): only what is missing runs.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for tests.mock_hub and this checkout's qwenmlx

from qwenmlx.bench import REAL_CONFIG, machine, measure_command, vm_hwm_gb  # noqa: E402

REPO_ID = "Qwen/Qwen3-30B-A3B"
DOCUMENTS = ROOT / "tests" / "fixtures" / "documents"
CHAT_MESSAGE = "In two sentences: what does a mixture-of-experts layer do with a token?"
RSS_TARGET_GB = 2.5


# --- the children: one side loaded and run (python scripts/full_scale.py --child TASK) ---

def run_qwenmlx(task: dict) -> dict:
    """qwenmlx.load, greedy generation from the prompt, then one chat turn on a fresh ChatSession."""
    from qwenmlx import load
    from qwenmlx.chat import ChatSession
    from qwenmlx.generate import Stats, generate_tokens

    start = time.perf_counter()
    model, tokenizer = load(task["model"])
    result = {"load_s": time.perf_counter() - start, "rss_after_load_gb": vm_hwm_gb()}
    stats = Stats()
    tokens = [token for token, _ in generate_tokens(model, task["prompt"], max_tokens=task["decode_tokens"],
                                                    stats=stats)]
    result.update(tokens=tokens, prefill_tps=stats.prefill_tps, decode_tps=stats.decode_tps,
                  peak_memory_gb=stats.peak_memory_gb)
    chat = ChatSession(model, tokenizer, thinking=False, max_tokens=task["decode_tokens"], temperature=0.0)
    reply = "".join(step.text for step in chat.reply(CHAT_MESSAGE))
    turn = chat.last_turn.stats
    result["chat"] = {"prompt_tokens": turn.prompt_tokens, "generated_tokens": turn.generated_tokens,
                      "prefill_tps": turn.prefill_tps, "decode_tps": turn.decode_tps, "reply_chars": len(reply)}
    return result


def run_mlx_lm(task: dict) -> dict:
    """mlx_lm.load, its weights cast to qwenmlx's compute dtype a layer at a time, greedy generate_step."""
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step

    from qwenmlx.checkpoint import compute_dtype

    start = time.perf_counter()
    model, _ = mlx_lm_load(task["model"])
    result = {"load_s": time.perf_counter() - start, "rss_after_load_gb": vm_hwm_gb()}
    start = time.perf_counter()
    for layer in model.layers:
        layer.set_dtype(compute_dtype())
        mx.eval(layer.parameters())
    model.set_dtype(compute_dtype())
    mx.eval(model.parameters())
    result["cast_s"] = time.perf_counter() - start
    mx.reset_peak_memory()
    tokens, start = [], time.perf_counter()
    for token, _ in generate_step(mx.array(task["prompt"]), model, max_tokens=task["decode_tokens"]):
        tokens.append(int(token))
        if len(tokens) == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    result.update(tokens=tokens, prefill_tps=len(task["prompt"]) / (first - start),
                  decode_tps=(len(tokens) - 1) / (end - first), peak_memory_gb=mx.get_peak_memory() / 1e9)
    return result


def child(task: dict) -> dict:
    result = (run_qwenmlx if task["side"] == "qwenmlx" else run_mlx_lm)(task)
    return {**result, "peak_rss_gb": vm_hwm_gb()}


def run_side(task: dict) -> dict:
    measured = measure_command([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(task)])
    return json.loads(measured.pop("stdout").strip().splitlines()[-1])


# --- the parent: serve, pull, measure ---

class DiskPeak:
    """The most bytes allocated under some directories, sampled every second on a thread of its own."""

    def __init__(self, *roots: Path):
        self.roots, self.peak, self.stopped = roots, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped.wait(1.0):
            self.peak = max(self.peak, sum(allocated(root) for root in self.roots))

    @staticmethod
    def now(*roots: Path) -> int:
        return sum(allocated(root) for root in roots)


def allocated(root: Path) -> int:
    """Bytes on disk under root (allocated blocks: a shard being written is sparse until it is filled)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:  # deleted while walking
                pass
    return total


def served_repo(layers: int, shard_bytes: int, workdir: Path):
    """The synthetic repo: the real config with `layers` layers, Qwen's tokenizer and chat files beside it."""
    from tests.qwen_tokenizer_files import write_tokenizer_files
    from tests.synthetic_checkpoint import synthetic_repo

    side = workdir / "side-files"
    if not (side / "tokenizer.json").is_file():
        write_tokenizer_files(side)
    config = {**json.loads(REAL_CONFIG.read_text()), "num_hidden_layers": layers}
    side_files = [side / "tokenizer.json", side / "tokenizer_config.json", side / "generation_config.json",
                  ROOT / "tests" / "fixtures" / "chat_template.jinja"]
    return synthetic_repo(config, shard_bytes, side_files)


def pull_figures(repo, workdir: Path, dst: Path) -> dict:
    """qwenmlx pull from the mock in a child under GNU time, with the disk sampled throughout."""
    from tests.mock_hub import MockHub

    shards = [f.size for name, f in repo.files.items() if name.endswith(".safetensors")]
    facts = {"served_gb": sum(shards) / 1e9, "input_shards": len(shards), "largest_shard_gb": max(shards) / 1e9}
    home, hf = workdir / "home", workdir / "hf"
    with MockHub({REPO_ID: repo}) as hub, DiskPeak(home, hf) as disk:
        os.environ.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf), QWENMLX_HOME=str(home),
                          HF_HUB_DISABLE_PROGRESS_BARS="1")
        measured = measure_command([sys.executable, "-m", "qwenmlx", "pull", REPO_ID, str(dst), "--json"])
    report = json.loads(measured.pop("stdout"))
    output = report["size_bytes"]
    facts.update(measured, output_gb=output / 1e9, peak_disk_gb=disk.peak / 1e9,
                 disk_bound_gb=(output + 2 * max(shards)) / 1e9, downloaded_gb=report["downloaded_gb"],
                 left_in_hf_cache_gb=DiskPeak.now(hf) / 1e9)
    facts["throughput_mb_s"] = report["downloaded_gb"] * 1e3 / facts["wall_s"]
    return facts


def document_and_prompt(dst: Path, workdir: Path, document_tokens: int, prompt_tokens: int) -> tuple[Path, list]:
    """The bundled articles cut to document_tokens (written to the workdir), and the first prompt_tokens of them."""
    from qwenmlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(dst)
    text = "\n\n".join(p.read_text() for p in sorted(DOCUMENTS.glob("*.md")))
    ids = tokenizer.encode(text)
    while len(ids) < document_tokens:
        ids += ids
    path = workdir / "document.md"
    path.write_text(tokenizer.decode(ids[:document_tokens]))
    return path, ids[:prompt_tokens]


def run(args) -> dict:
    """Every step in order; the figures so far are saved to full_scale.json after each one."""
    from qwenmlx.checkpoint import compute_dtype
    from qwenmlx.memory import weights_in_memory

    workdir = args.workdir.expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "layers": args.layers, "prompt_tokens": args.prompt_tokens,
              "decode_tokens": args.decode_tokens, "pull": None}
    saved = workdir / "full_scale.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    same_settings = all(earlier.get(key) == result[key] for key in ("layers", "prompt_tokens", "decode_tokens"))

    def step(label: str) -> None:
        saved.write_text(json.dumps(result, indent=2))
        print(f"[{time.strftime('%H:%M:%S')}] {label}", file=sys.stderr)

    dst = workdir / "home" / "models" / f"Qwen3-30B-A3B-{args.layers}-layers-experts-4"
    repo = served_repo(args.layers, int(args.shard_gb * 1e9), workdir)
    if (dst / "config.json").is_file():
        result["pull"] = earlier.get("pull") if earlier.get("layers") == args.layers else None
        step(f"{dst} is there: the pull is skipped")
    else:
        step(f"pulling {REPO_ID} ({args.layers} layers) from the mock Hub into {dst}")
        result["pull"] = pull_figures(repo, workdir, dst)
    document, prompt = document_and_prompt(dst, workdir, args.document_tokens, args.prompt_tokens)
    result["memory_check_weights_gb"] = weights_in_memory(dst, compute_dtype()) / 1e9
    result["sides"] = {}
    for side in ("qwenmlx", "mlx-lm"):
        if same_settings and side in earlier.get("sides", {}):
            result["sides"][side] = earlier["sides"][side]
            step(f"{side}: measured by an earlier run with the same settings, kept")
            continue
        step(f"loading and generating with {side}")
        result["sides"][side] = run_side({"side": side, "model": str(dst), "prompt": prompt,
                                          "decode_tokens": args.decode_tokens})
    result["same_tokens"] = result["sides"]["qwenmlx"]["tokens"] == result["sides"]["mlx-lm"]["tokens"]
    step(f"summarising {document} ({args.document_tokens:,} tokens)")
    measured = measure_command([sys.executable, "-m", "qwenmlx", "summarize", str(document), "-m", str(dst),
                                "--json", "--max-tokens", str(args.summary_tokens)])
    summary = json.loads(measured.pop("stdout"))
    result["summarize"] = {**measured, "document_tokens": summary["document_tokens"], "strategy": summary["strategy"],
                           "final": summary["final"], "seconds": summary["seconds"]}
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    step("done")
    return result


def tables(r: dict) -> str:
    """The figures as Markdown, for the README."""
    lines = []
    p = r["pull"]
    if p:
        met = "met" if p["peak_rss_gb"] <= RSS_TARGET_GB else "NOT met"
        disk_met = "met" if p["peak_disk_gb"] <= p["disk_bound_gb"] else "NOT met"
        lines += [f"**Pull: {r['layers']} layers, {p['served_gb']:.1f} GB served in {p['input_shards']} shards "
                  f"(largest {p['largest_shard_gb']:.2f} GB), experts-4**", "",
                  "| figure | value |", "|---|---:|",
                  f"| written (GB) | {p['output_gb']:.2f} |",
                  f"| wall time (min) | {p['wall_s'] / 60:.1f} |",
                  f"| downloaded (MB/s) | {p['throughput_mb_s']:.0f} |",
                  f"| peak RSS (GB), target ≤ {RSS_TARGET_GB} | {p['peak_rss_gb']:.2f} ({met}) |",
                  f"| peak disk (GB), bound output + 2 shards = {p['disk_bound_gb']:.2f} | {p['peak_disk_gb']:.2f} "
                  f"({disk_met}) |",
                  f"| left in the Hugging Face cache (GB) | {p['left_in_hf_cache_gb']:.3f} |", ""]
    lines += [f"**Load and generate: {len(r['sides']['qwenmlx']['tokens'])} tokens greedily after a "
              f"{r['prompt_tokens']}-token prompt; same tokens: {'yes' if r['same_tokens'] else 'NO'}**", "",
              "| side | load (s) | RSS after load (GB) | prefill tok/s | decode tok/s | MLX peak (GB) | peak RSS (GB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for side, s in r["sides"].items():
        lines.append(f"| {side} | {s['load_s']:.1f} | {s['rss_after_load_gb']:.2f} | {s['prefill_tps']:.2f} | "
                     f"{s['decode_tps']:.2f} | {s['peak_memory_gb']:.2f} | {s['peak_rss_gb']:.2f} |")
    c, s = r["sides"]["qwenmlx"]["chat"], r["summarize"]
    lines += ["", f"The memory check's figure for the weights (qwenmlx, this machine's dtype): "
                  f"{r['memory_check_weights_gb']:.2f} GB.", "",
              "| run | prompt tokens | prefill tok/s | decode tok/s | wall (s) | peak RSS (GB) |",
              "|---|---:|---:|---:|---:|---:|",
              f"| chat turn (ChatSession) | {c['prompt_tokens']} | {c['prefill_tps']:.2f} | {c['decode_tps']:.2f} | — | — |",
              f"| summarize --json, {s['document_tokens']:,}-token document ({s['strategy']}) | "
              f"{s['final']['prompt_tokens']:,} | {s['final']['prefill_tps']:.2f} | {s['final']['decode_tps']:.2f} | "
              f"{s['wall_s']:.0f} | {s['peak_rss_gb']:.2f} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48, help="Layers of the real 48 to serve (default: all).")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qwenmlx-full-scale",
                        help="Where the pulled model, the Hugging Face cache and the results go.")
    parser.add_argument("--shard-gb", type=float, default=4.0,
                        help="Input shard size (the Hub's: about 4 GB; at least 1.3, so that a layer's experts, "
                             "1.2 GB, span two shards at most).")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--document-tokens", type=int, default=3000)
    parser.add_argument("--summary-tokens", type=int, default=32, help="--max-tokens of the summary.")
    parser.add_argument("--json", action="store_true", help="Print the JSON instead of the Markdown tables.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if not 1 <= args.layers <= 48:
        parser.error(f"--layers must be 1 to 48, got {args.layers}")
    if args.shard_gb < 1.3:
        parser.error(f"--shard-gb must be at least 1.3, got {args.shard_gb}")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else tables(result))


if __name__ == "__main__":
    main()
