"""Experts streamed from disk under a memory budget compute exactly what the fully loaded model computes."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from quantize import get_recipe
from qwenmlx.cache import make_cache
from qwenmlx.checkpoint import load_model, memory_budget_parts
from qwenmlx.convert import convert
from qwenmlx.errors import QwenMLXError
from qwenmlx.experts import StreamedExperts, parse_budget, stream_counts
from qwenmlx.generate import generate_tokens

GROUP_SIZE = 32  # the tiny experts' down_proj has 32 inputs
PROMPT = np.random.default_rng(0).integers(0, 1000, 40).tolist()  # 40 tokens x 2 experts: the sorted prefill path
SLOTS = 3  # of 8 experts, 2 per token: decode evicts


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir, tmp_path_factory):
    """A function: the tiny checkpoint of a variant, converted with a recipe (None, bf16: as transformers writes
    it in float32, bfloat16), made once each."""
    made = {}

    def get(variant: str, recipe: str | None) -> str:
        if (variant, recipe) not in made:
            source = checkpoint_dir(variant, torch.bfloat16 if recipe == "bf16" else torch.float32)
            if recipe in (None, "bf16"):  # Hugging Face's layout: one tensor per expert
                made[variant, recipe] = source
            else:
                dst = tmp_path_factory.mktemp("experts") / f"{variant}-{recipe}"
                convert(source, dst, get_recipe(recipe, GROUP_SIZE))
                made[variant, recipe] = dst
        return made[variant, recipe]

    return get


def budget_for(model_dir, slots: int) -> int:
    parts = memory_budget_parts(model_dir)
    return parts.resident_bytes + parts.prefill_bytes + slots * sum(parts.expert_bytes)


def greedy(model, cache_kind: dict) -> list[int]:
    return [t for t, _ in generate_tokens(model, PROMPT, cache=make_cache(model, **cache_kind), max_tokens=12)]


CACHE_KINDS = {"full": {}, "rotating": {"max_kv_size": 24}, "kv-bits-8": {"kv_bits": 8}}


@pytest.mark.parametrize("threads", [1, None], ids=["one-core", "cpu-split"])
@pytest.mark.parametrize("recipe, policy", [(None, "lru"), ("bf16", "lru"), ("q4", "lru"), ("q6", "lru"),
                                            ("q8", "lru"), ("mxfp4", "lru"), (None, "lfu"), ("q4", "lfu")])
@pytest.mark.parametrize("variant", ["moe", "moe-mha-mlp-only-layers"])
def test_streamed_experts_give_bitwise_the_logits_and_greedy_tokens_of_the_loaded_model(
        checkpoint, variant, recipe, policy, threads):
    model_dir = checkpoint(variant, recipe)
    loaded, _ = load_model(model_dir, threads=threads)
    streamed, _ = load_model(model_dir, threads=threads, memory_budget=budget_for(model_dir, SLOTS),
                             expert_policy=policy)
    assert any(isinstance(layer.mlp.switch_mlp, StreamedExperts) for layer in streamed.layers)
    tokens = mx.array(PROMPT)[None]
    for length in (1, 5, len(PROMPT)):  # decode-sized (slots) and prefill-sized (expert order) calls
        assert mx.array_equal(loaded(tokens[:, :length]), streamed(tokens[:, :length])).item()
    for kind in CACHE_KINDS.values():
        assert greedy(loaded, kind) == greedy(streamed, kind)
    counts = stream_counts(streamed)
    assert counts.misses > 0 and counts.hits > 0  # decode both found experts in slots and read others


def test_budget_below_the_minimum_is_one_line_naming_the_minimum(moe_dir):
    minimum = memory_budget_parts(moe_dir).minimum
    with pytest.raises(QwenMLXError, match=f"minimum of {minimum / 1e9:.3g} GB") as raised:
        load_model(moe_dir, memory_budget=minimum - 1)
    assert "\n" not in str(raised.value)
    load_model(moe_dir, memory_budget=minimum)


def test_budget_for_all_the_weights_loads_them_all(moe_dir):
    parts = memory_budget_parts(moe_dir)
    model, _ = load_model(moe_dir, memory_budget=parts.resident_bytes + 8 * sum(parts.expert_bytes))
    assert not any(isinstance(m, StreamedExperts) for m in model.modules())


def test_dense_model_under_its_weights_is_refused(checkpoint_dir):
    dense = checkpoint_dir("dense")
    with pytest.raises(QwenMLXError, match="no experts to stream"):
        load_model(dense, memory_budget=memory_budget_parts(dense).resident_bytes - 1)


@pytest.mark.parametrize("text, n_bytes", [("10GB", 10**10), ("512MB", 512 * 10**6), ("1.5 GiB", 3 * 2**29),
                                           (12345, 12345), ("2g", 2 * 10**9)])
def test_budget_sizes_parse(text, n_bytes):
    assert parse_budget(text) == n_bytes


@pytest.mark.parametrize("text", ["ten GB", "10XB", "0", "-1GB", ""])
def test_budget_that_is_not_a_size_is_refused(text):
    with pytest.raises(QwenMLXError, match="memory budget"):
        parse_budget(text)
