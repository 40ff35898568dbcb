"""Splitting matmuls over CPU streams (qwenmlx/cpu_streams.py) changes no number, and is on by default on the CPU."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from qwenmlx.cache import make_cache
from qwenmlx.checkpoint import load_model
from qwenmlx.cli import app
from qwenmlx.cpu_streams import NO_CORES, Cores, cpu_threads
from tests.checkpoints import MODEL_VARIANTS
from tests.test_bench import tiny_models


def prefill_and_decode(model, tokens: np.ndarray, **cache_options) -> list[mx.array]:
    """Logits of a prompt (sorted experts' path), then of three single tokens through the cache."""
    cache = make_cache(model, **cache_options)
    out = [model(mx.array(tokens[:, :-3]), cache)]
    out += [model(mx.array(tokens[:, i : i + 1]), cache) for i in range(tokens.shape[1] - 3, tokens.shape[1])]
    mx.eval(out)
    return out


def every_matmul_split(n_streams: int) -> Cores:
    """Streams with no size threshold, so that the tiny models' projections are split too."""
    return Cores(tuple(mx.new_stream(mx.cpu) for _ in range(n_streams)), min_rows=1)


def assert_same_with_and_without_split(model, tokens: np.ndarray, **cache_options) -> None:
    model.use_cores(NO_CORES)
    whole = prefill_and_decode(model, tokens, **cache_options)
    for n_streams in (2, 3):  # 3: blocks of unequal size
        model.use_cores(every_matmul_split(n_streams))
        for a, b in zip(whole, prefill_and_decode(model, tokens, **cache_options)):
            assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_splitting_over_streams_gives_bitwise_the_same_logits(checkpoint_dir, variant):
    model, _ = load_model(checkpoint_dir(variant))
    tokens = np.random.default_rng(4).integers(0, 151_000, (1, 40))
    assert_same_with_and_without_split(model, tokens)


@pytest.mark.parametrize("cache_options", [{}, {"max_kv_size": 24}, {"kv_bits": 8}, {"max_kv_size": 24, "kv_bits": 4}],
                         ids=["growing", "rotating", "8-bit", "rotating-4-bit"])
def test_splitting_quantized_projections_experts_and_heads_gives_bitwise_the_same_logits(cache_options):
    model = tiny_models(2)[0]
    tokens = np.random.default_rng(5).integers(0, 512, (1, 40))
    assert_same_with_and_without_split(model, tokens, **cache_options)


def test_the_cpu_splits_over_every_core_by_default_and_one_thread_splits_nothing(moe_dir):
    model, _ = load_model(moe_dir)
    assert len(model.cores.streams) == (cpu_threads() if cpu_threads() > 1 else 0)
    assert all(layer.self_attn.cores is model.cores for layer in model.layers)
    assert all(layer.mlp.switch_mlp.cores is model.cores for layer in model.layers)
    single, _ = load_model(moe_dir, threads=1)
    assert single.cores == NO_CORES and single.layers[0].self_attn.cores == NO_CORES


def test_zero_threads_is_a_one_line_error(moe_dir):
    result = CliRunner().invoke(app, ["generate", "-m", str(moe_dir), "-p", "hi", "--threads", "0"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --threads must be at least 1, got 0"


def test_more_threads_than_cores_are_capped_at_the_cores_with_a_note(moe_dir):
    assert len(Cores.for_device(cpu_threads() + 100).streams) == len(Cores.for_device().streams)
    result = CliRunner().invoke(app, ["generate", "-m", str(moe_dir), "-p", "hi", "--max-tokens", "1",
                                      "--threads", "999"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (f"note: --threads 999: this machine gives qwenmlx {cpu_threads()} cores, "
                                     f"so it uses {cpu_threads()}")


def test_profile_decode_times_each_part_on_one_stream_and_on_every_core(moe_dir):
    result = subprocess.run([sys.executable, "scripts/profile_decode.py", str(moe_dir), "--context", "16",
                             "--repeats", "1", "--json"], capture_output=True, text=True, check=True)
    timings = json.loads(result.stdout)
    assert list(timings) == ["one stream", "split over the cores"]
    for parts in timings.values():
        assert {"q|k|v projection", "mlp (router + experts)", "final norm + lm_head", "whole step"} <= set(parts)
        assert all(seconds > 0 for seconds in parts.values())
