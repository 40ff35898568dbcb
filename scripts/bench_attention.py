"""Prefill and decode speed of one Qwen3-30B-A3B attention layer at long context: plain, SelfExtend, dual chunk.

At 8K and 32K tokens attention dominates a step, and the three differ only there. One layer of the real
shape (32 query heads, 4 KV heads, head_dim 128) with random weights; its cache is filled with random keys
and values through the cache's own write path (as `qwenmlx bench` fills its long-context caches), then
timed: single-token decode steps, and one prefill chunk of queries at the end of the context. The methods
take turns on each context, so a machine whose load changes changes each one's figures alike.

    python scripts/bench_attention.py --contexts 8192,32768 --decode-steps 8 --prefill-tokens 64
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from qwenmlx.attention import make_attention  # noqa: E402
from qwenmlx.cache import KVCache  # noqa: E402
from qwenmlx.config import QWEN_DUAL_CHUNK, config_from_dict  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "config-Qwen3-30B-A3B-2507.json"
METHODS = {
    "plain": {},
    "SelfExtend 4:2048": {"self_extend": {"group_size": 4, "window": 2048}},
    "dual chunk (Qwen's 1M values)": {"dual_chunk_attention_config": QWEN_DUAL_CHUNK},
}


def layer_for(settings: dict):
    config = config_from_dict({**json.loads(FIXTURE.read_text()), **settings})
    attention = make_attention(config, 0)
    attention.fuse()
    mx.eval(attention.parameters())
    return attention, config


def filled_cache(attention, config, tokens: int) -> KVCache:
    cache = KVCache(rotated_keys=attention.rotated_keys)
    shape = (1, config.num_key_value_heads, tokens, config.head_dim)
    cache.store(mx.random.normal(shape), mx.random.normal(shape))
    mx.eval(cache.state)
    return cache


def seconds(run) -> float:
    start = time.perf_counter()
    mx.eval(run())
    return time.perf_counter() - start


def measure(method: str, context: int, decode_steps: int, prefill_tokens: int) -> dict:
    attention, config = layer_for(METHODS[method])
    x = mx.random.normal((1, 1, config.hidden_size))
    cache = filled_cache(attention, config, context - decode_steps)
    decode = [seconds(lambda: attention(x, cache)) for _ in range(decode_steps)]
    cache = filled_cache(attention, config, context - prefill_tokens)
    chunk = mx.random.normal((1, prefill_tokens, config.hidden_size))
    prefill = seconds(lambda: attention(chunk, cache))
    return {"method": method, "context": context, "decode_tps": 1 / statistics.median(decode),
            "prefill_tps": prefill_tokens / prefill}


# MInference's default pattern on every head (Qwen's per-head values for the 2507 models were not at hand),
# sparse at any length so that it runs at these contexts.
SPARSE = {**QWEN_DUAL_CHUNK, "sparse_attention_threshold": 0,
          "sparse_attention_config": [{str(h): ["vertical_and_slash", 1000, 6096, 1.0] for h in range(32)}] * 48}


def measure_sparse(context: int, prefill_tokens: int) -> dict:
    """One prefill chunk at the end of `context` tokens, dense dual chunk attention against the sparse prefill:
    the speed ratio and the largest difference in the layer's output, relative to its largest value."""
    dense, config = layer_for({"dual_chunk_attention_config": SPARSE})
    sparse, _ = layer_for({"dual_chunk_attention_config": SPARSE, "sparse_prefill": True})
    sparse.update(dense.parameters())
    shape = (1, config.num_key_value_heads, context - prefill_tokens, config.head_dim)
    keys, values = mx.random.normal(shape), mx.random.normal(shape)
    chunk = mx.random.normal((1, prefill_tokens, config.hidden_size))
    outputs, times = {}, {"dense": [], "sparse": []}
    for name in ("dense", "sparse") * 2:  # taking turns, as the methods above
        cache = KVCache(rotated_keys=False)
        cache.store(keys, values)
        mx.eval(cache.state)
        start = time.perf_counter()
        outputs[name] = (dense if name == "dense" else sparse)(chunk, cache)
        mx.eval(outputs[name])
        times[name].append(time.perf_counter() - start)
    error = mx.abs(outputs["sparse"] - outputs["dense"]).max() / mx.abs(outputs["dense"]).max()
    return {"context": context, "dense_tps": prefill_tokens / min(times["dense"]),
            "sparse_tps": prefill_tokens / min(times["sparse"]), "error": error.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=64)
    args = parser.parse_args()
    print(f"{'context':>8}  {'method':<30} {'decode tok/s':>12} {'× plain':>8} {'prefill tok/s':>13} {'× plain':>8}")
    for context in (int(c) for c in args.contexts.split(",")):
        rows = [measure(m, context, args.decode_steps, args.prefill_tokens) for m in METHODS]
        plain = rows[0]
        for r in rows:
            print(f"{context:>8}  {r['method']:<30} {r['decode_tps']:>12.1f} {r['decode_tps'] / plain['decode_tps']:>8.2f}"
                  f" {r['prefill_tps']:>13.1f} {r['prefill_tps'] / plain['prefill_tps']:>8.2f}")
    print(f"\nsparse prefill (vertical 1000, slash 6096 per head) against dense dual chunk attention, "
          f"{args.prefill_tokens} queries at the end of the context")
    print(f"{'context':>8}  {'dense tok/s':>11} {'sparse tok/s':>12} {'speed-up':>8} {'max |Δ| / max':>13}")
    for context in (int(c) for c in args.contexts.split(",")):
        r = measure_sparse(context, args.prefill_tokens)
        print(f"{context:>8}  {r['dense_tps']:>11.1f} {r['sparse_tps']:>12.1f} {r['sparse_tps'] / r['dense_tps']:>8.2f}"
              f" {r['error']:>13.4f}")


if __name__ == "__main__":
    main()
