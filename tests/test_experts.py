"""Experts streamed from disk under a memory budget compute exactly what the fully loaded model computes."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from quantize import get_recipe
from qwenmlx.cache import make_cache
from qwenmlx.checkpoint import load_model, memory_budget_parts
from qwenmlx.cli import app
from qwenmlx.convert import convert
from qwenmlx.errors import QwenMLXError
from qwenmlx.experts import SlotTable, StreamedExperts, parse_budget, stream_counts
from qwenmlx.generate import generate_tokens
from qwenmlx.memory import budget_limits, check_memory, model_limits, summary_context, weights_budget, weights_in_memory
from qwenmlx.strategy import MAP_REDUCE, SINGLE_PASS, choose_strategy
from tests.checkpoints import TINY_MOE, write_hf_checkpoint
from tests.documents import CHINESE
from tests.errors import one_line_error

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


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory):
    """A MoE checkpoint whose experts are nearly all of its 400 MB in float32 (200 MB of bf16 on disk)."""
    config = dict(TINY_MOE, vocab_size=1024, hidden_size=256, moe_intermediate_size=512, num_experts=64,
                  num_hidden_layers=4)
    return write_hf_checkpoint(tmp_path_factory.mktemp("big-experts"), config, dtype=torch.bfloat16)


def budget_for(model_dir, slots: int) -> int:
    parts = memory_budget_parts(model_dir)
    return parts.resident_bytes + slots * parts.slot_bytes


def greedy(model, cache_kind: dict) -> list[int]:
    return [t for t, _ in generate_tokens(model, PROMPT, cache=make_cache(model, **cache_kind), max_tokens=12)]


CACHE_KINDS = {"full": {}, "rotating": {"max_kv_size": 24}, "kv-bits-8": {"kv_bits": 8}}


@pytest.mark.parametrize("threads", [1, None], ids=["one-core", "cpu-split"])
@pytest.mark.parametrize("recipe, policy, read_ahead", [
    (None, "lru", False), ("bf16", "lru", False), ("q4", "lru", False), ("q6", "lru", False), ("q8", "lru", False),
    ("mxfp4", "lru", False), (None, "lfu", False), ("q4", "lfu", False), (None, "lru", True), ("q4", "lfu", True),
    (None, "global-lru", False), ("q4", "global-lru", False), ("mxfp4", "global-lru", True)])
@pytest.mark.parametrize("variant", ["moe", "moe-mha-mlp-only-layers"])
def test_streamed_experts_give_bitwise_the_logits_and_greedy_tokens_of_the_loaded_model(
        checkpoint, variant, recipe, policy, read_ahead, threads):
    model_dir = checkpoint(variant, recipe)
    loaded, _ = load_model(model_dir, threads=threads)
    streamed, _ = load_model(model_dir, threads=threads, memory_budget=budget_for(model_dir, SLOTS),
                             expert_policy=policy, read_ahead=read_ahead)
    assert any(isinstance(layer.mlp.switch_mlp, StreamedExperts) for layer in streamed.layers)
    tokens = mx.array(PROMPT)[None]
    for length in (1, 5, len(PROMPT)):  # decode-sized (slots) and prefill-sized (expert order) calls
        assert mx.array_equal(loaded(tokens[:, :length]), streamed(tokens[:, :length])).item()
    for kind in CACHE_KINDS.values():
        assert greedy(loaded, kind) == greedy(streamed, kind)
    counts = stream_counts(streamed)
    assert counts.misses > 0 and counts.hits > 0  # decode both found experts in slots and read others


def test_a_shared_pool_evicts_the_least_recently_used_expert_of_any_layer():
    table = SlotTable(4, "lru")
    for layer, experts in ((0, [0, 1]), (1, [0, 1]), (0, [2, 3])):
        table.place([(layer, e) for e in experts])
    assert sorted(table.held) == [(0, 2), (0, 3), (1, 0), (1, 1)]  # layer 0's own were the least recent
    _, reads = table.place([(0, 0), (0, 1)])
    assert sorted(key for key, _ in reads) == [(0, 0), (0, 1)]
    assert sorted(table.held) == [(0, 0), (0, 1), (0, 2), (0, 3)]  # now layer 1's were: more than a quota


def test_reading_ahead_changes_neither_the_tokens_nor_what_the_slots_hold(moe_dir):
    runs = {}
    for read_ahead in (False, True):
        model, _ = load_model(moe_dir, memory_budget=budget_for(moe_dir, SLOTS), read_ahead=read_ahead)
        runs[read_ahead] = greedy(model, {}), stream_counts(model)
    (tokens, plain), (tokens_ahead, ahead) = runs[False], runs[True]
    assert tokens_ahead == tokens
    assert (ahead.hits, ahead.misses) == (plain.hits, plain.misses)
    assert plain.read_ahead_used == plain.read_ahead_unused == 0
    assert ahead.read_ahead_used <= ahead.misses
    # What it read ahead and did not use is read in vain; what it used was a miss read anyway.
    one_expert = memory_budget_parts(moe_dir).expert_bytes[0]
    assert ahead.bytes_read == plain.bytes_read + ahead.read_ahead_unused * one_expert


def test_reading_misses_while_computing_changes_neither_the_tokens_nor_what_is_read(moe_dir):
    runs = {}
    for overlap in (False, True):
        model, _ = load_model(moe_dir, memory_budget=budget_for(moe_dir, SLOTS), overlap_reads=overlap)
        runs[overlap] = greedy(model, {}), stream_counts(model)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == runs[False][1]
    assert runs[True][1].hits > 0 and runs[True][1].misses > 0  # steps that both computed early and read


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


def test_a_budget_sets_the_kv_cache_aside_before_the_weights(moe_dir):
    kv = model_limits(moe_dir).kv_cache_bytes(1000)
    minimum = memory_budget_parts(moe_dir).minimum
    assert weights_budget(moe_dir, minimum + kv, 1000) == minimum
    with pytest.raises(QwenMLXError, match=f"needs at least: its weights' minimum {minimum / 1e9:.3g} GB"):
        weights_budget(moe_dir, minimum + kv - 1, 1000)


def test_the_memory_check_suggests_a_budget_that_fits(big_experts):
    parts, kv = memory_budget_parts(big_experts), model_limits(big_experts).kv_cache_bytes(256)
    available = (parts.minimum + weights_in_memory(big_experts, mx.float32)) // 2 + kv  # fits only when streamed
    message = one_line_error(lambda: check_memory(big_experts, 256, budget=available))
    suggested = re.search(r"--memory-budget (\S+) \(experts streamed from disk\)", message)[1]
    check_memory(big_experts, 256, budget=available, weights_budget=weights_budget(big_experts, suggested, 256))


def test_generate_with_a_memory_budget_says_what_it_says_without(moe_dir):
    argv = ["generate", "-m", str(moe_dir), "-p", "Name three colours.", "--temp", "0", "--max-tokens", "12"]
    minimum = memory_budget_parts(moe_dir).minimum
    loaded = CliRunner().invoke(app, argv)
    streamed = CliRunner().invoke(app, [*argv, "--memory-budget", f"{(minimum + 10**6) // 1000}KB"])
    assert loaded.exit_code == streamed.exit_code == 0, streamed.output
    assert streamed.stdout == loaded.stdout


def test_summarize_under_a_budget_plans_within_its_kv_share(moe_dir):
    kv_for_1024 = model_limits(moe_dir).kv_cache_bytes(1024)
    budget = memory_budget_parts(moe_dir).minimum + kv_for_1024
    context = summary_context(moe_dir, budget, answer_tokens=64)
    assert 64 <= context <= 1024  # the native window (4,096) does not fit beside the weights' minimum
    limits = budget_limits(moe_dir, budget, context)
    assert limits.memory_budget == budget and limits.context_fitting(None) >= context
    for document_tokens in (context // 2, 4 * context):
        plan = choose_strategy(document_tokens, 64, limits)
        assert plan.strategy == (MAP_REDUCE if document_tokens > context else SINGLE_PASS)
        assert plan.strategy == MAP_REDUCE or plan.memory_needed <= budget


def test_summarize_with_a_budget_plans_every_step_within_it(moe_dir):
    budget = memory_budget_parts(moe_dir).minimum + model_limits(moe_dir).kv_cache_bytes(512)
    result = CliRunner().invoke(app, ["summarize", str(CHINESE), "-m", str(moe_dir), "--max-tokens", "4",
                                      "--memory-budget", str(budget), "--json"])
    assert result.exit_code == 0, result.output
    plans = json.loads(result.stdout)["plans"]
    assert plans[0]["strategy"] == MAP_REDUCE  # its 2,000+ tokens exceed the KV cache's share, even at 8 bits
    assert all(p["memory_budget"] == budget for p in plans)
    assert all(p["memory_needed"] <= budget for p in plans if p["strategy"] != MAP_REDUCE)


def test_serve_counts_its_prompt_cache_inside_the_budget(moe_dir):
    parts, kv = memory_budget_parts(moe_dir), model_limits(moe_dir).kv_cache_bytes(256)
    assert weights_budget(moe_dir, parts.minimum + kv + 10**6, 256, prompt_cache_bytes=10**6) == parts.minimum
    with pytest.raises(QwenMLXError, match="prompt cache 0.001 GB"):
        weights_budget(moe_dir, parts.minimum + kv + 10**6, 256, prompt_cache_bytes=10**6 + 1)


PEAK_RSS_CHILD = """
import json, re, sys
from pathlib import Path
from qwenmlx.checkpoint import load_model
from qwenmlx.generate import generate_tokens

def peak_rss():  # this process's own high-water mark (ru_maxrss would carry the parent's over exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024

before = peak_rss()
model, _ = load_model(sys.argv[1], memory_budget=int(sys.argv[2]) if sys.argv[2] != "none" else None)
tokens = [t for t, _ in generate_tokens(model, list(range(1, 41)), max_tokens=16)]
print(json.dumps({"imports": before, "peak": peak_rss()}))
"""
RSS_OVERHEAD = 32 * 10**6  # past the budget: the KV cache, read buffers, MLX's allocator


def peak_rss_in_a_child(model_dir, budget: int | None) -> int:
    """The peak RSS of loading the model and generating 16 tokens after a 40-token prompt, less the imports'."""
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(model_dir), str(budget or "none")],
                         capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout)
    return figures["peak"] - figures["imports"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from Linux's /proc")
def test_a_budgeted_process_stays_within_its_budget_and_an_unbudgeted_one_does_not(big_experts):
    budget = memory_budget_parts(big_experts).minimum + 30 * 10**6
    assert peak_rss_in_a_child(big_experts, budget) <= budget + RSS_OVERHEAD
    assert peak_rss_in_a_child(big_experts, None) > budget + RSS_OVERHEAD
