"""qwenmlx on a GPU (Metal on a Mac, or CUDA) against transformers: what the CPU test suite cannot check.

    python scripts/gpu_check.py [--json]

The suite runs on MLX's CPU backend, where qwenmlx computes in float32. On a GPU it computes in
bf16 and uses the GPU's kernels (matmuls, gather_qmm, fast attention, RoPE, RMSNorm). This writes
the tests' tiny random Qwen3-MoE checkpoint (float32, through transformers: needs the dev extra),
then on the GPU compares, with transformers in float32 on the CPU as the reference:

- the logits of an 80-token prompt, qwenmlx in float32 and in its GPU default (bf16);
- decoding token by token through the KV cache against one prefill (float32);
- the experts-4 conversion's logits against the float32 original's (KL divergence, top-1 agreement).

Exits 1 when a float32 figure is past the suite's tolerance. MLX rounds float32 matmuls through
TF32 on CUDA and on M5 Macs unless MLX_ENABLE_TF32=0, which this script sets unless told otherwise
(`MLX_ENABLE_TF32=1 python scripts/gpu_check.py` shows what TF32 costs). `scripts/bench.py` gives
the speed against mlx-lm on the same device.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.checkpoints
os.environ.setdefault("MLX_ENABLE_TF32", "0")  # float32 computed in float32, as transformers does: read at import

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from quantize import get_recipe  # noqa: E402
from qwenmlx.cache import make_cache  # noqa: E402
from qwenmlx.checkpoint import load_model  # noqa: E402
from qwenmlx.convert import convert  # noqa: E402
from qwenmlx.fidelity import compare_logits  # noqa: E402
from tests.checkpoints import TINY_MOE, transformers_logits, write_hf_checkpoint  # noqa: E402

FLOAT32_ATOL = 1e-4  # tests/test_model.py's
PREFILL = 50  # tokens of the prompt prefilled before decoding the rest one at a time


def logits(model, tokens: np.ndarray) -> mx.array:
    return model(mx.array(tokens))[0].astype(mx.float32)


def decoded_one_at_a_time(model, tokens: np.ndarray) -> mx.array:
    cache = make_cache(model)
    steps = [model(mx.array(tokens[:, :PREFILL]), cache)[0]]
    steps += [model(mx.array(tokens[:, i : i + 1]), cache)[0] for i in range(PREFILL, tokens.shape[1])]
    return mx.concatenate(steps).astype(mx.float32)


def check(workdir: Path) -> dict:
    hf_dir = write_hf_checkpoint(workdir / "hf", TINY_MOE)
    tokens = np.random.default_rng(0).integers(0, 151_000, (1, 80))
    reference = mx.array(transformers_logits(hf_dir, tokens)[0])

    float32_model, _ = load_model(hf_dir, dtype=mx.float32)
    default_model, _ = load_model(hf_dir)
    float32_logits = logits(float32_model, tokens)
    convert(hf_dir, workdir / "experts-4", get_recipe("experts-4", group_size=32))  # the tiny model's widths are 32
    quantized_model, _ = load_model(workdir / "experts-4")
    return {
        "device": str(mx.default_device()),
        "MLX_ENABLE_TF32": os.environ["MLX_ENABLE_TF32"],
        "default_dtype": str(default_model.model.embed_tokens.weight.dtype),
        "float32": compare_logits(reference, float32_logits),
        "default_dtype_vs_transformers": compare_logits(reference, logits(default_model, tokens)),
        "cache_decode_vs_prefill_float32": compare_logits(float32_logits, decoded_one_at_a_time(float32_model, tokens)),
        "experts_4_vs_float32": compare_logits(float32_logits, logits(quantized_model, tokens)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenmlx-gpu-check-") as workdir:
        figures = check(Path(workdir))
    failed = [name for name in ("float32", "cache_decode_vs_prefill_float32")
              if figures[name]["max_abs_logit_diff"] > FLOAT32_ATOL or figures[name]["top1_agreement"] < 1]
    if args.json:
        print(json.dumps({**figures, "failed": failed}, indent=2))
    else:
        print(f"device: {figures['device']} (default dtype {figures['default_dtype']}, "
              f"MLX_ENABLE_TF32={figures['MLX_ENABLE_TF32']})")
        for name, row in figures.items():
            if isinstance(row, dict):
                print(f"{name:32} max |diff| {row['max_abs_logit_diff']:.2e}  KL {row['kl_divergence']:.2e}  "
                      f"top-1 {row['top1_agreement']:.3f}")
        print("FAILED: " + ", ".join(failed) if failed else f"float32 within {FLOAT32_ATOL}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
