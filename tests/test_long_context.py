"""Attention past the trained window (attention.py) against numpy references written from its authors' code."""

from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from qwenmlx.cache import make_cache
from qwenmlx.checkpoint import load_model
from qwenmlx.errors import QwenMLXError
from tests import long_context_reference as ref
from tests.checkpoints import MODEL_VARIANTS

LOGITS_ATOL = 1e-4  # float32 on both sides; what is left is summation order
PROMPT_LEN = 96  # six windows of 16
THETA = 1_000_000.0


def prompt(length: int = PROMPT_LEN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 151_000, (1, length))


def random_qkv(L: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, 4, L, 32)), rng.standard_normal((1, 2, L, 32)),
            rng.standard_normal((1, 2, L, 32)))


@pytest.mark.parametrize("group_size", [1, 4])
def test_self_extend_reference_is_plain_causal_rope_attention_when_the_window_covers_the_prompt(group_size):
    q, k, v = random_qkv(40)
    plain = ref.causal_rope_attention(q, k, v, THETA, 32**-0.5)
    np.testing.assert_allclose(ref.self_extend_attention(q, k, v, THETA, 32**-0.5, group_size, 40), plain,
                               atol=1e-12)


def test_self_extend_reference_differs_from_plain_attention_past_the_window():
    q, k, v = random_qkv(40)
    plain = ref.causal_rope_attention(q, k, v, THETA, 32**-0.5)
    extended = ref.self_extend_attention(q, k, v, THETA, 32**-0.5, 4, 8)
    np.testing.assert_allclose(extended[:, :, :8], plain[:, :, :8], atol=1e-12)  # no pair past the window yet
    assert np.abs(extended[:, :, 8:] - plain[:, :, 8:]).max() > 1e-3


@pytest.fixture(scope="module")
def self_extend_cases(checkpoint_dir):
    """(variant, group, window) -> (model dir, reference logits of the prompt)."""
    cases = {}

    def get(variant: str, group_size: int, window: int):
        key = (variant, group_size, window)
        if key not in cases:
            model_dir = checkpoint_dir(variant)
            theta = MODEL_VARIANTS[variant]["rope_theta"]
            attention = partial(self_extend_reference, theta=theta, group_size=group_size, window=window)
            cases[key] = model_dir, ref.reference_logits(model_dir, prompt(), attention)
        return cases[key]

    return get


def self_extend_reference(q, k, v, scale, *, theta, group_size, window):
    return ref.self_extend_attention(q, k, v, theta, scale, group_size, window)


SELF_EXTEND_CASES = [("moe", 4, 16), ("dense", 4, 16), ("moe", 3, 10)]  # the last: window not a multiple of group


@pytest.mark.parametrize("variant,group_size,window", SELF_EXTEND_CASES)
def test_self_extend_prefill_matches_longlm_reference(self_extend_cases, variant, group_size, window):
    model_dir, expected = self_extend_cases(variant, group_size, window)
    model, _ = load_model(model_dir, self_extend={"group_size": group_size, "window": window})
    np.testing.assert_allclose(np.array(model(mx.array(prompt()))), expected, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("variant,group_size,window", SELF_EXTEND_CASES)
def test_self_extend_chunked_prefill_and_cached_decode_match_longlm_reference(
        self_extend_cases, variant, group_size, window):
    model_dir, expected = self_extend_cases(variant, group_size, window)
    model, _ = load_model(model_dir, self_extend={"group_size": group_size, "window": window})
    tokens, cache = prompt(), make_cache(model)
    steps = [np.array(model(mx.array(tokens[:, :25]), cache)), np.array(model(mx.array(tokens[:, 25:60]), cache))]
    for i in range(60, tokens.shape[1]):
        steps.append(np.array(model(mx.array(tokens[:, i : i + 1]), cache)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, atol=LOGITS_ATOL, rtol=0)


def test_self_extend_cache_holds_unrotated_keys_and_refuses_to_rotate(moe_dir):
    model, _ = load_model(moe_dir, self_extend={"group_size": 4, "window": 16})
    assert all(not c.rotated_keys for c in make_cache(model))
    with pytest.raises(QwenMLXError, match="--max-kv-size"):
        make_cache(model, max_kv_size=64)


def test_self_extend_attention_over_an_8_bit_cache_stays_near_the_float_cache(moe_dir):
    model, _ = load_model(moe_dir, self_extend={"group_size": 4, "window": 16})
    attention = model.layers[0].self_attn
    x = mx.random.normal((1, PROMPT_LEN, MODEL_VARIANTS["moe"]["hidden_size"]), key=mx.random.key(0))
    exact = np.array(attention(x, make_cache(model)[0]))
    quantized = np.array(attention(x, make_cache(model, kv_bits=8)[0]))
    assert np.abs(quantized - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("settings", [{"group_size": 0, "window": 16}, {"group_size": 4, "window": -1},
                                      {"group_size": 4.0, "window": 16}, {"group_size": 4}, "4:16"])
def test_load_refuses_bad_self_extend_settings(moe_dir, settings):
    with pytest.raises(QwenMLXError, match="self_extend"):
        load_model(moe_dir, self_extend=settings)


def test_generate_with_self_extend_answers_as_the_library_model_does(moe_dir):
    from typer.testing import CliRunner

    from qwenmlx.checkpoint import load
    from qwenmlx.cli import app
    from qwenmlx.generate import GREEDY, prompt_messages, stream_generate

    result = CliRunner().invoke(app, ["generate", "-m", str(moe_dir), "-p", "hi", "--self-extend", "2:4",
                                      "--max-tokens", "5", "--temp", "0", "--no-memory-check"])
    assert result.exit_code == 0, result.output
    model, tokenizer = load(moe_dir, self_extend={"group_size": 2, "window": 4})
    tokens = tokenizer.apply_chat_template(prompt_messages("hi"), enable_thinking=False, tokenize=True)
    expected = "".join(step.text for step in stream_generate(model, tokenizer, tokens, sampling=GREEDY, max_tokens=5))
    assert result.stdout == expected + "\n"
