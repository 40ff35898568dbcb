"""The memory check before loading: the estimate is what loading takes, and a model that does not fit is refused
in one line that says by how much and what would fit (with a forged, small figure for the free memory)."""

import re

import mlx.core as mx
import pytest
import torch
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import qwenmlx.memory
from quantize import get_recipe
from qwenmlx.cache import kv_cache_bytes, kv_elements_per_token
from qwenmlx.checkpoint import load_model
from qwenmlx.cli import app
from qwenmlx.config import read_config
from qwenmlx.convert import convert, memory_plan, plan_conversion
from qwenmlx.errors import QwenMLXError
from qwenmlx.memory import check_memory, model_limits, weights_in_memory
from tests.errors import one_line_error

GROUP_SIZE = 32  # the tiny model's expert down_proj has 32 inputs


@pytest.fixture(scope="module")
def quantized(checkpoint_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("experts-4") / "out"
    convert(checkpoint_dir("moe", torch.bfloat16), dst, get_recipe("experts-4", GROUP_SIZE))
    return dst


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("which", ["hf-float32", "hf-bfloat16", "experts-4"])
def test_weights_estimate_is_what_load_model_holds(checkpoint_dir, quantized, which, dtype):
    model_dir = {"hf-float32": checkpoint_dir("moe"), "hf-bfloat16": checkpoint_dir("moe", torch.bfloat16),
                 "experts-4": quantized}[which]
    model, _ = load_model(model_dir, dtype=dtype)
    assert weights_in_memory(model_dir, dtype) == sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_convert_plan_memory_is_the_memory_check_figure_on_a_mac(checkpoint_dir, quantized):
    plan = plan_conversion(checkpoint_dir("moe", torch.bfloat16), get_recipe("experts-4", GROUP_SIZE))
    limits = model_limits(quantized, dtype=mx.bfloat16, budget=0)  # a Mac computes in bf16
    assert memory_plan(plan, 4096)["memory_gb"] == round(limits.memory_needed(4096) / 1e9, 3)


def kv_bytes(model_dir, tokens: int, bits=None) -> int:
    return kv_cache_bytes(kv_elements_per_token(read_config(model_dir)), tokens, bits, dtype_bytes=4)


def test_a_model_that_does_not_fit_is_refused_with_what_would_fit(quantized):
    weights = weights_in_memory(quantized, mx.float32)
    window = read_config(quantized).max_position_embeddings
    budget = weights + kv_bytes(quantized, window) * 6 // 10  # an 8-bit cache fits, a float one does not
    message = one_line_error(lambda: check_memory(quantized, kv_bits_option=True, context_option="--max-kv-size",
                                                  budget=budget))
    assert f"for {window:,} tokens" in message and "short" in message and "--no-memory-check" in message
    tokens = int(re.search(r"--max-kv-size (\d+)", message).group(1))
    assert "--kv-bits 8" in message
    check_memory(quantized, tokens, budget=budget)  # what it suggests does fit
    check_memory(quantized, kv_bits=8, budget=budget)
    with pytest.raises(QwenMLXError):
        check_memory(quantized, tokens + 256, budget=budget)  # and is the most that fits


def test_weights_that_alone_do_not_fit_suggest_a_smaller_recipe(quantized):
    message = one_line_error(lambda: check_memory(quantized, 4096, context_option="--max-kv-size",
                                                  budget=weights_in_memory(quantized, mx.float32) // 2))
    assert "smaller recipe" in message and "--max-kv-size" not in message


def test_generate_checks_memory_unless_told_not_to(quantized, monkeypatch):
    weights = weights_in_memory(quantized, mx.float32)
    monkeypatch.setattr(qwenmlx.memory, "available_memory", lambda: weights + kv_bytes(quantized, 256))
    argv = ["generate", "-m", str(quantized), "-p", "Hi", "--max-tokens", "400"]
    refused = CliRunner().invoke(app, argv)
    assert refused.exit_code == 1
    assert re.fullmatch(r"error: .*would fit with --max-tokens \d+; --no-memory-check loads it anyway\n",
                        refused.stderr)
    loaded = CliRunner().invoke(app, [*argv, "--no-memory-check"])
    assert loaded.exit_code == 0, loaded.output


DUAL_CHUNK = {"chunk_size": 1024, "local_size": 256, "original_max_position_embeddings": 2048}


@pytest.fixture(scope="module")
def config_1m(quantized, tmp_path_factory):
    """The quantized tiny model with a config_1m.json-like config: dual chunk attention, a 1,010,000 window."""
    from tests.checkpoints import checkpoint_variant

    return checkpoint_variant(quantized, tmp_path_factory.mktemp("config_1m") / "model", {"config.json": {
        "dual_chunk_attention_config": DUAL_CHUNK, "max_position_embeddings": 1_010_000}})


@pytest.mark.parametrize("attention", [{"self_extend": {"group_size": 4, "window": 64}, "dual_chunk": False},
                                       {"self_extend": None, "dual_chunk": True}, "config_1m"])
def test_past_the_window_the_check_suggests_kv_bits_8_never_the_rotating_cache(quantized, config_1m, attention):
    model_dir, attention = (config_1m, None) if attention == "config_1m" else (quantized, attention)
    weights = weights_in_memory(model_dir, mx.float32)
    budget = weights + kv_bytes(model_dir, 4096) * 6 // 10  # an 8-bit cache fits, a float one does not
    message = one_line_error(lambda: check_memory(model_dir, 4096, kv_bits_option=True, context_option="--max-kv-size",
                                                  attention=attention, budget=budget))
    assert "--kv-bits 8" in message and "--max-kv-size" not in message


def test_a_config_1m_model_with_no_bound_is_checked_at_its_trained_window(config_1m):
    trained = DUAL_CHUNK["original_max_position_embeddings"]
    budget = weights_in_memory(config_1m, mx.float32) + kv_bytes(config_1m, trained)
    check_memory(config_1m, budget=budget)  # not at 1,010,000 tokens, which would need ~500 times that cache
    message = one_line_error(lambda: check_memory(config_1m, budget=budget - 1))
    assert f"for {trained:,} tokens" in message
