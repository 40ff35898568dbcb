"""The MLX model against transformers' Qwen3MoeForCausalLM / Qwen3ForCausalLM, number for number."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from qwenmlx.cache import make_cache
from qwenmlx.checkpoint import load_model
from tests.checkpoints import MODEL_VARIANTS, transformers_logits

# Both sides compute in float32 on the same weights; what is left is summation order.
LOGITS_ATOL = 1e-4
PROMPT_LEN = 80


def prompt(length: int = PROMPT_LEN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 151_000, (1, length))


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_logits_match_transformers(checkpoint_dir, variant):
    model_dir = checkpoint_dir(variant)
    tokens = prompt()
    model, _ = load_model(model_dir)
    np.testing.assert_allclose(np.array(model(mx.array(tokens))), transformers_logits(model_dir, tokens),
                               atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_bf16_checkpoint_matches_transformers_on_the_same_weights(checkpoint_dir, variant):
    model_dir = checkpoint_dir(variant, torch.bfloat16)
    tokens = prompt()
    model, _ = load_model(model_dir)
    assert model.model.embed_tokens.weight.dtype == mx.float32  # computed in float32 on the CPU
    np.testing.assert_allclose(np.array(model(mx.array(tokens))), transformers_logits(model_dir, tokens),
                               atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_token_by_token_decode_through_the_cache_equals_one_prefill(checkpoint_dir, variant):
    model, _ = load_model(checkpoint_dir(variant))
    tokens = prompt(70, seed=1)
    full = np.array(model(mx.array(tokens)))
    cache = make_cache(model)
    # A 50-token prefill, then one token at a time.
    steps = [np.array(model(mx.array(tokens[:, :50]), cache))]
    for i in range(50, tokens.shape[1]):
        steps.append(np.array(model(mx.array(tokens[:, i : i + 1]), cache)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=LOGITS_ATOL, rtol=0)


def test_batched_prompts_match_one_at_a_time(moe_dir):
    model, _ = load_model(moe_dir)
    tokens = np.concatenate([prompt(40, seed=2), prompt(40, seed=3)])
    batched = np.array(model(mx.array(tokens)))
    for row in range(2):
        single = np.array(model(mx.array(tokens[row : row + 1])))
        np.testing.assert_allclose(batched[row : row + 1], single, atol=LOGITS_ATOL, rtol=0)


def test_experts_are_stacked_per_layer_with_gate_and_up_fused(moe_dir):
    model, _ = load_model(moe_dir)
    experts = model.layers[0].mlp.switch_mlp
    c = model.config
    assert experts.gate_up_proj.weight.shape == (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size)
    assert experts.down_proj.weight.shape == (c.num_experts, c.hidden_size, c.moe_intermediate_size)
    attention = model.layers[0].self_attn
    assert attention.qkv_proj.weight.shape == ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim,
                                               c.hidden_size)


def test_the_gpu_check_script_passes_on_the_cpu():
    """scripts/gpu_check.py is run by hand on a GPU; here it must run and hold the same tolerance."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout)
    assert figures["failed"] == [] and figures["MLX_ENABLE_TF32"] == "0"
    for name in ("float32", "cache_decode_vs_prefill_float32"):
        assert figures[name]["max_abs_logit_diff"] <= LOGITS_ATOL and figures[name]["top1_agreement"] == 1
