"""YaRN RoPE against transformers' own rope-init function, and end to end far past the original context."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from qwenmlx.checkpoint import load_model
from qwenmlx.config import config_from_dict
from qwenmlx.rope import RoPE, yarn_inv_freq
from tests.checkpoints import TINY_MOE, write_hf_checkpoint

REAL_CONFIG = json.loads((Path(__file__).parent / "fixtures" / "config-Qwen3-30B-A3B.json").read_text())
QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def transformers_yarn(scaling: dict, max_position_embeddings: int = 131072):
    """inv_freq and attention factor from transformers, for Qwen3-30B-A3B's real head_dim and theta."""
    config = Qwen3MoeConfig(
        head_dim=128, hidden_size=2048, num_attention_heads=32, max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": REAL_CONFIG["rope_theta"], **scaling},
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    return inv_freq.numpy(), attention_factor


@pytest.mark.parametrize(
    "scaling",
    [
        QWEN_YARN,
        dict(QWEN_YARN, factor=2.0),
        dict(QWEN_YARN, attention_factor=1.5),  # given explicitly: honoured, not recomputed
        dict(QWEN_YARN, truncate=False),  # unrounded correction range
        dict(QWEN_YARN, beta_fast=16, beta_slow=2),
        dict(QWEN_YARN, mscale=0.707, mscale_all_dim=1.0),
        {"rope_type": "yarn", "factor": 4.0},  # original length absent: max_position_embeddings stands in
    ],
    ids=["qwen", "factor2", "attention_factor", "no_truncate", "betas", "mscale", "no_original"],
)
def test_yarn_frequencies_and_attention_factor_match_transformers(scaling):
    expected_inv_freq, expected_factor = transformers_yarn(scaling)
    inv_freq, factor = yarn_inv_freq(128, REAL_CONFIG["rope_theta"], scaling, 131072)
    np.testing.assert_allclose(inv_freq, expected_inv_freq, rtol=1e-6)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_qwen_yarn_attention_factor_is_the_papers_default():
    _, factor = yarn_inv_freq(128, 1e6, QWEN_YARN, 40960)
    assert factor == pytest.approx(0.1 * np.log(4.0) + 1.0)


def test_rope_module_rotates_like_transformers_cos_sin():
    """mx.fast.rope with our frequencies equals transformers' rotate_half formula at large positions."""
    inv_freq, _ = yarn_inv_freq(128, 1e6, QWEN_YARN, 40960)
    rope = RoPE(128, 1e6, QWEN_YARN, 40960)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 128)).astype(np.float32)
    offset = 100_000
    positions = np.arange(offset, offset + 5, dtype=np.float32)
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    rotate_half = np.concatenate([-x[..., 64:], x[..., :64]], -1)
    expected = x * cos + rotate_half * sin
    np.testing.assert_allclose(np.array(rope(mx.array(x), offset)), expected, atol=2e-3)


def test_rope_parameters_and_legacy_rope_scaling_read_the_same():
    legacy = dict(REAL_CONFIG, rope_scaling=QWEN_YARN)
    new = {k: v for k, v in REAL_CONFIG.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {"rope_theta": REAL_CONFIG["rope_theta"], **QWEN_YARN}
    a, b = config_from_dict(legacy), config_from_dict(new)
    assert a.rope_theta == b.rope_theta == 1e6
    assert a.rope_scaling == b.rope_scaling == QWEN_YARN


# A tiny model whose "original" context is 32 tokens, run over 200: YaRN does real work here.
TINY_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def yarn_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("yarn"), dict(TINY_MOE, rope_scaling=TINY_YARN))


def transformers_logits(model_dir, tokens, **config_overrides):
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **config_overrides).eval()
    with torch.no_grad():
        return ref(torch.tensor(tokens)).logits.numpy()


def test_yarn_checkpoint_logits_match_transformers_far_past_the_original_length(yarn_dir):
    tokens = np.random.default_rng(5).integers(0, 151_000, (1, 200))
    model, _ = load_model(yarn_dir)
    assert model.config.rope_scaling["factor"] == 4.0
    np.testing.assert_allclose(np.array(model(mx.array(tokens))), transformers_logits(yarn_dir, tokens),
                               atol=1e-4, rtol=0)


def test_yarn_enabled_at_load_time_matches_transformers_with_that_scaling(moe_dir):
    tokens = np.random.default_rng(6).integers(0, 151_000, (1, 200))
    model, _ = load_model(moe_dir, rope_scaling=TINY_YARN)
    rope_parameters = {"rope_theta": TINY_MOE["rope_theta"], **TINY_YARN}
    expected = transformers_logits(moe_dir, tokens, rope_parameters=rope_parameters)
    np.testing.assert_allclose(np.array(model(mx.array(tokens))), expected, atol=1e-4, rtol=0)


def test_set_rope_scaling_switches_yarn_on_and_off_without_reloading(moe_dir):
    tokens = mx.array(np.random.default_rng(7).integers(0, 151_000, (1, 100)))
    plain, _ = load_model(moe_dir)
    scaled, _ = load_model(moe_dir, rope_scaling=TINY_YARN)
    switched, _ = load_model(moe_dir)
    switched.set_rope_scaling(TINY_YARN)
    np.testing.assert_allclose(np.array(switched(tokens)), np.array(scaled(tokens)), atol=1e-5, rtol=0)
    switched.set_rope_scaling(None)
    np.testing.assert_allclose(np.array(switched(tokens)), np.array(plain(tokens)), atol=1e-5, rtol=0)
