"""Peak RSS and wall time of `qwenmlx convert` against `mlx_lm.convert` on the same synthetic checkpoint.

The checkpoint has Qwen3-30B-A3B's real tensor shapes (vocab 151936, hidden 2048, 128 experts of
768, 32/4 heads of 128) with fewer layers, bf16 random weights, in Hugging Face's per-expert layout
and 2 GB shards. Each converter runs in its own child process, measured by /usr/bin/time -v, with
the same recipe (4-bit affine, group 64, router at 8 bits: mlx-lm's default for Qwen3-MoE), and the
two outputs are compared tensor by tensor.

    python scripts/bench_convert.py --layers 2 --workdir /tmp/bench-convert
"""

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARD_BYTES = 2 * 10**9


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


def write_synthetic_checkpoint(dst: Path, layers: int) -> None:
    from tests.qwen_tokenizer_files import write_tokenizer_files

    config = json.loads((ROOT / "tests/fixtures/config-Qwen3-30B-A3B.json").read_text())
    config["num_hidden_layers"] = layers
    dst.mkdir(parents=True)
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
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(dst / name, shard, rng)
        weight_map.update(dict.fromkeys(shard, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_files(dst)


def measure(command: list[str]) -> dict:
    """Peak RSS (GB) and wall time (s) of a child process, from GNU time."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's qwenmlx, whatever is installed
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        raise SystemExit(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return {"peak_rss_gb": round(rss_kb * 1024 / 1e9, 2), "wall_s": round(seconds, 1)}


def same_tensors(a: Path, b: Path) -> bool:
    import mlx.core as mx

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(mx.load(str(f)))
        return out

    ours, theirs = tensors(a), tensors(b)
    return set(ours) == set(theirs) and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-convert"))
    args = parser.parse_args()

    src = args.workdir / f"synthetic-30b-a3b-{args.layers}l"
    if not src.exists():
        print(f"writing {src} ...", flush=True)
        write_synthetic_checkpoint(src, args.layers)
    src_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    ours_dir, theirs_dir = args.workdir / "qwenmlx-q4", args.workdir / "mlx-lm-q4"
    shutil.rmtree(ours_dir, ignore_errors=True)
    shutil.rmtree(theirs_dir, ignore_errors=True)

    python = sys.executable
    ours = measure([python, "-m", "qwenmlx", "convert", str(src), str(ours_dir), "--recipe", "q4", "--json"])
    theirs = measure([python, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(theirs_dir),
                      "-q", "--q-bits", "4", "--q-group-size", "64", "--dtype", "bfloat16"])
    print(f"input: {src_gb:.2f} GB bf16 ({args.layers} layers of Qwen3-30B-A3B's shapes), recipe q4 g64")
    print(f"{'':10} {'peak RSS (GB)':>14} {'wall (s)':>9}")
    print(f"{'qwenmlx':10} {ours['peak_rss_gb']:>14} {ours['wall_s']:>9}")
    print(f"{'mlx-lm':10} {theirs['peak_rss_gb']:>14} {theirs['wall_s']:>9}")
    print(f"peak RSS ratio qwenmlx / mlx-lm: {ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}")
    print(f"outputs identical tensor for tensor: {same_tensors(ours_dir, theirs_dir)}")


if __name__ == "__main__":
    main()
