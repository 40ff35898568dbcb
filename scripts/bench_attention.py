"""Prefill and decode speed of one Qwen3-30B-A3B attention layer at long context: plain, SelfExtend, dual chunk.

At 8K and 32K tokens attention dominates a step, and the three differ only there. One layer of the real
shape (32 query heads, 4 KV heads, head_dim 128) with random weights; its cache is filled with random keys
and values through the cache's own write path (as `qwenmlx bench` fills its long-context caches), then
timed: single-token decode steps, and one prefill chunk of queries at the end of the context. The methods
take turns on each context, so a machine whose load changes changes each one's figures alike.

The sparse prefill is timed against dense dual chunk attention on a longer prefill chunk (its index choice is
made once per chunk), on random queries and keys and on ones whose attention falls with distance.

    python scripts/bench_attention.py --contexts 8192,32768 --decode-steps 8 --prefill-tokens 64
    python scripts/bench_attention.py --contexts 8192,16384 --sparse-only --sparse-prefill-tokens 1024
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
# What the sparse prefill is measured on: random queries and keys (flat attention, so the chosen distances are
# spread at random), and queries and keys sharing one direction in RoPE's slowest frequencies, so that a query
# attends more to nearer keys and the chosen distances are mostly the nearest, as in a local head.
ATTENTION_KINDS = {"flat": 0.0, "local": 1.5}


def attention_inputs(config, context: int, queries: int, shared: float) -> tuple[mx.array, mx.array, mx.array]:
    """Queries (of the last `queries` tokens), keys (unrotated) and values of `context` tokens, random, plus
    `shared` times one direction that the queries and keys share in the slowest half of RoPE's frequencies."""
    D = config.head_dim
    direction = mx.where(mx.arange(D) % (D // 2) >= D // 4, mx.random.normal((D,)), 0) * shared
    q = mx.random.normal((1, config.num_attention_heads, queries, D)) + direction
    k = mx.random.normal((1, config.num_key_value_heads, context, D)) + direction
    return q, k, mx.random.normal((1, config.num_key_value_heads, context, D))


def measure_sparse(context: int, prefill_tokens: int, kind: str) -> dict:
    """The attention of one prefill chunk at the end of `context` tokens (after the projections, which both
    share), dense dual chunk attention against the sparse prefill: the speed ratio and the largest difference
    in the output, relative to its largest value."""
    dense, config = layer_for({"dual_chunk_attention_config": SPARSE})
    sparse, _ = layer_for({"dual_chunk_attention_config": SPARSE, "sparse_prefill": True})
    assert context <= dense.chunk_len, "the cache is filled as dual chunk attention places its first chunk"
    q, k, v = attention_inputs(config, context, prefill_tokens, ATTENTION_KINDS[kind])
    past = context - prefill_tokens
    placed = dense.rope.at(k[:, :, :past], mx.arange(past))  # within the first chunk: at their index, unscaled
    qk = mx.concatenate([q, k[:, :, past:]], axis=1)
    mx.eval(placed, qk, v)
    outputs, times = {}, {"dense": [], "sparse": []}
    for name in ("dense", "sparse") * 2:  # taking turns, as the methods above
        cache = KVCache(rotated_keys=False)
        cache.store(placed, v[:, :, :past])
        mx.eval(cache.state)
        start = time.perf_counter()
        outputs[name] = (dense if name == "dense" else sparse).attend(qk, v[:, :, past:], cache)
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
    parser.add_argument("--sparse-prefill-tokens", type=int, default=1024,
                        help="the prefill chunk of the sparse prefill's rows (its index choice pays on long chunks)")
    parser.add_argument("--sparse-only", action="store_true", help="only the sparse prefill's rows")
    args = parser.parse_args()
    mx.set_cache_limit(128 * 2**20)  # MLX keeps freed buffers for reuse; bounded, so a run stays near what it uses
    contexts = [int(c) for c in args.contexts.split(",")]
    if not args.sparse_only:
        print(f"{'context':>8}  {'method':<30} {'decode tok/s':>12} {'× plain':>8} {'prefill tok/s':>13} {'× plain':>8}")
        for context in contexts:
            rows = [measure(m, context, args.decode_steps, args.prefill_tokens) for m in METHODS]
            plain = rows[0]
            for r in rows:
                print(f"{context:>8}  {r['method']:<30} {r['decode_tps']:>12.1f} "
                      f"{r['decode_tps'] / plain['decode_tps']:>8.2f} {r['prefill_tps']:>13.1f} "
                      f"{r['prefill_tps'] / plain['prefill_tps']:>8.2f}")
        print()
    print(f"sparse prefill (vertical 1000, slash 6096 per head) against dense dual chunk attention, "
          f"{args.sparse_prefill_tokens} queries at the end of the context, attention alone")
    print(f"{'context':>8}  {'attention':<9} {'dense tok/s':>11} {'sparse tok/s':>12} {'speed-up':>8} "
          f"{'max |Δ| / max':>13}")
    for context in contexts:
        for kind in ATTENTION_KINDS:
            r = measure_sparse(context, args.sparse_prefill_tokens, kind)
            print(f"{context:>8}  {kind:<9} {r['dense_tps']:>11.1f} {r['sparse_tps']:>12.1f} "
                  f"{r['sparse_tps'] / r['dense_tps']:>8.2f} {r['error']:>13.4f}", flush=True)


if __name__ == "__main__":
    main()
