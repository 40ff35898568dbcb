"""Where one decode step's time goes, part by part, on one stream and split over the CPU cores.

    python scripts/profile_decode.py /tmp/qwenmlx-bench/experts-4-2l-XXXXXXXX   # a `qwenmlx bench` checkpoint
    python scripts/profile_decode.py DIR --context 8192 --json

Each part of the first layer (and the output head) is evaluated on its own, on inputs that are already
evaluated, best of --repeats; the whole step is timed too. The parts' sum is close to the step's time
less what the other layers add.
"""

import json
import sys
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from qwenmlx.cache import make_cache  # noqa: E402
from qwenmlx.checkpoint import load_model  # noqa: E402
from qwenmlx.cpu_streams import NO_CORES, Cores  # noqa: E402


def best_seconds(compute, repeats: int) -> float:
    mx.eval(compute())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(compute())
        best = min(best, time.perf_counter() - start)
    return best


def profile(model, context: int, repeats: int) -> dict[str, float]:
    """Seconds per part of one decode step over a cache holding `context` random tokens."""
    c = model.config
    cache = make_cache(model)
    shape = (1, c.num_key_value_heads, context, c.head_dim)
    keys, values = mx.random.normal(shape), mx.random.normal(shape)
    for layer_cache in cache:
        layer_cache.store(keys, values)
    mx.eval([layer_cache.state for layer_cache in cache])
    token = mx.array([[5]])
    layer, layer_cache = model.layers[0], cache[0]
    attention = layer.self_attn
    x = model.model.embed_tokens(token)
    normed = layer.input_layernorm(x)
    heads_out = mx.zeros((1, 1, attention.n_heads * attention.head_dim))
    mx.eval(x, normed, heads_out)

    def attention_step():
        out = attention(normed, layer_cache)
        layer_cache.trim(1)
        return out

    parts = {
        "attention (all of it)": attention_step,
        "q|k|v projection": lambda: attention.cores.rows(attention.qkv_proj, normed),
        "o projection": lambda: attention.cores.rows(attention.o_proj, heads_out),
        "mlp (router + experts)": lambda: layer.mlp(normed),
        "router": lambda: layer.mlp.gate(normed),
        "final norm + lm_head": lambda: model.cores.rows(model.lm_head, model.model.norm(x)),
    }

    def whole_step():
        out = model(token, cache)
        for layer_cache in cache:
            layer_cache.trim(1)
        return out

    times = {name: best_seconds(compute, repeats) for name, compute in parts.items()}
    times["whole step"] = best_seconds(whole_step, repeats)
    return times


def main(model_dir: str = typer.Argument(..., help="A MoE checkpoint directory (e.g. one `qwenmlx bench` wrote)."),
         context: int = typer.Option(512, "--context", help="Tokens already in the cache."),
         repeats: int = typer.Option(5, "--repeats"),
         json_output: bool = typer.Option(False, "--json")):
    model, _ = load_model(model_dir)
    if model.config.tie_word_embeddings or "qkv_proj" not in model.layers[0].self_attn:
        raise SystemExit(f"{model_dir}: expected an untied model with fused q|k|v, as `qwenmlx bench` writes")
    results = {}
    for label, cores in (("one stream", NO_CORES), ("split over the cores", Cores.for_device())):
        model.use_cores(cores)
        results[label] = profile(model, context, repeats)
    if json_output:
        print(json.dumps(results, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"One decode step at {context} tokens of context, layer 0 and the head (ms)")
    table.add_column("part")
    for label in results:
        table.add_column(label, justify="right")
    for part in next(iter(results.values())):
        table.add_row(part, *(f"{results[label][part] * 1000:.1f}" for label in results))
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
