"""The strategy at each boundary: native window, YaRN factor 2 / 3 / 4, memory with an 8-bit KV cache, map-reduce."""

import json

import pytest

from qwenmlx.config import config_from_dict
from qwenmlx.strategy import (
    DUAL_CHUNK,
    MAP_REDUCE,
    SELF_EXTEND,
    SINGLE_PASS,
    YARN,
    Limits,
    choose_strategy,
    config_limits,
    native_context,
    self_extend_context,
    yarn_scaling,
)
from tests.qwen_tokenizer_files import FIXTURES

GB = 10**9
GiB = 2**30
ANSWER = 1024


@pytest.fixture(scope="module")
def qwen3_30b_config():
    return config_from_dict(json.loads((FIXTURES / "config-Qwen3-30B-A3B.json").read_text()))


@pytest.fixture(scope="module")
def roomy(qwen3_30b_config) -> Limits:
    """Qwen3-30B-A3B at 4 bits (17 GB) in bf16 on a machine with memory to spare."""
    return config_limits(qwen3_30b_config, 17 * GB, dtype_bytes=2, memory_budget=1000 * GB)


def test_qwen3_native_context_is_32768_not_the_configs_40960(qwen3_30b_config):
    assert qwen3_30b_config.max_position_embeddings == 40960
    assert native_context(qwen3_30b_config) == 32768


def test_a_configs_yarn_base_is_the_native_context(qwen3_30b_config):
    config = config_from_dict({**json.loads((FIXTURES / "config-Qwen3-30B-A3B.json").read_text()),
                               "rope_scaling": yarn_scaling(4, 32768), "max_position_embeddings": 131072})
    assert native_context(config) == 32768


def test_qwen3_30b_kv_cache_is_96_kib_per_token_and_12_gib_at_128k(roomy):
    assert roomy.kv_elements_per_token == 2 * 48 * 4 * 128
    assert roomy.kv_cache_bytes(1) == roomy.kv_cache_bytes(256) == 256 * 96 * 1024  # grows 256 tokens at a time
    assert roomy.kv_cache_bytes(131072) == 12 * GiB
    assert roomy.kv_cache_bytes(131072, kv_bits=8) == 12 * GiB * 8.5 // 16  # 8 bits + bf16 scale and bias per 64


@pytest.mark.parametrize("context, strategy, factor", [
    (32768, SINGLE_PASS, None),
    (32769, YARN, 2),
    (65536, YARN, 2),
    (65537, YARN, 3),
    (98305, YARN, 4),
    (131072, YARN, 4),
    (131073, MAP_REDUCE, None),
])
def test_strategy_at_each_window_boundary(roomy, context, strategy, factor):
    plan = choose_strategy(context - ANSWER, ANSWER, roomy)
    assert (plan.strategy, plan.yarn_factor, plan.kv_bits) == (strategy, factor, None)
    assert plan.context_tokens == context


def test_the_answer_counts_toward_the_window(roomy):
    assert choose_strategy(32000, 768, roomy).strategy == SINGLE_PASS
    assert choose_strategy(32000, 769, roomy).yarn_factor == 2


def test_an_8bit_kv_cache_is_used_when_only_it_fits_in_memory(qwen3_30b_config):
    context = 131072
    probe = config_limits(qwen3_30b_config, 17 * GB, 2, 0)
    full, eight_bit = probe.memory_needed(context), probe.memory_needed(context, 8)
    for budget, kv_bits in [(full, None), (full - 1, 8), (eight_bit, 8)]:
        limits = config_limits(qwen3_30b_config, 17 * GB, 2, budget)
        plan = choose_strategy(context - ANSWER, ANSWER, limits)
        assert (plan.strategy, plan.yarn_factor, plan.kv_bits) == (YARN, 4, kv_bits)
        assert plan.memory_needed <= budget


def test_map_reduce_when_even_an_8bit_kv_cache_does_not_fit(qwen3_30b_config):
    probe = config_limits(qwen3_30b_config, 17 * GB, 2, 0)
    limits = config_limits(qwen3_30b_config, 17 * GB, 2, probe.memory_needed(32768, 8) - 1)
    plan = choose_strategy(32768 - ANSWER, ANSWER, limits)
    assert plan.strategy == MAP_REDUCE
    assert "even with an 8-bit KV cache" in plan.describe()


def test_with_24_gb_128k_tokens_need_an_8bit_cache_and_with_20_gb_they_need_map_reduce(qwen3_30b_config):
    limits = config_limits(qwen3_30b_config, 17 * GB, 2, memory_budget=24 * GB)
    assert choose_strategy(65536 - ANSWER, ANSWER, limits).kv_bits is None
    assert choose_strategy(131072 - ANSWER, ANSWER, limits).kv_bits == 8
    limits = config_limits(qwen3_30b_config, 17 * GB, 2, memory_budget=20 * GB)
    assert choose_strategy(131072 - ANSWER, ANSWER, limits).strategy == MAP_REDUCE
    assert limits.longest_context() == 57344  # 3 GB of 8-bit cache, in whole 256-token steps


def test_a_head_dim_without_quantization_groups_gets_no_8bit_cache(qwen3_30b_config):
    config = config_from_dict({**json.loads((FIXTURES / "config-Qwen3-30B-A3B.json").read_text()), "head_dim": 16})
    limits = config_limits(config, GB, 4, memory_budget=10 * GB)
    assert limits.kv_bits_options() == (None,)


@pytest.mark.parametrize("strategy_context, words", [
    (1000, "single pass, no YaRN"), (40000, "YaRN factor 2"), (200000, "the most YaRN factor 4 allows"),
])
def test_the_plan_says_which_strategy_and_why(roomy, strategy_context, words):
    plan = choose_strategy(strategy_context, ANSWER, roomy)
    assert words in plan.describe()
    assert plan.to_dict()["description"] == plan.describe()


@pytest.mark.parametrize("group_size, window", [(4, 2048), (3, 1000), (8, 512), (1, 4096)])
def test_self_extend_context_is_the_longest_whose_grouped_positions_stay_trained(group_size, window):
    native = 32768
    tokens = self_extend_context(native, {"group_size": group_size, "window": window})

    def last_grouped_query_position(n_tokens: int) -> int:
        return (n_tokens - 1) // group_size + window - window // group_size

    assert last_grouped_query_position(tokens) <= native - 1 < last_grouped_query_position(tokens + 1)


@pytest.fixture(scope="module")
def roomy_self_extend(qwen3_30b_config) -> Limits:
    """Qwen3-30B-A3B as `roomy`, loaded with SelfExtend group 4, window 2,048 (a 124,928-token window)."""
    limits = config_limits(qwen3_30b_config, 17 * GB, dtype_bytes=2, memory_budget=1000 * GB)
    limits.self_extend = {"group_size": 4, "window": 2048}
    return limits


@pytest.mark.parametrize("context, strategy", [
    (32768, SINGLE_PASS), (32769, SELF_EXTEND), (124928, SELF_EXTEND), (124929, MAP_REDUCE),
])
def test_a_model_loaded_with_self_extend_reads_its_window_instead_of_yarn(roomy_self_extend, context, strategy):
    plan = choose_strategy(context - ANSWER, ANSWER, roomy_self_extend)
    assert (plan.strategy, plan.yarn_factor) == (strategy, None)


@pytest.mark.parametrize("context, words", [
    (40000, "SelfExtend (group 4, window 2,048, as asked)"), (200000, "exceed 124,928, SelfExtend's window"),
])
def test_the_self_extend_plan_says_which_and_why(roomy_self_extend, context, words):
    assert words in choose_strategy(context, ANSWER, roomy_self_extend).describe()


def fixture_config(name: str):
    return config_from_dict(json.loads((FIXTURES / name).read_text()))


@pytest.fixture(scope="module")
def roomy_2507() -> Limits:
    """Qwen3-30B-A3B-2507 (262,144 native tokens) at 4 bits, as its config.json loads it."""
    return config_limits(fixture_config("config-Qwen3-30B-A3B-2507.json"), 17 * GB, dtype_bytes=2,
                         memory_budget=1000 * GB)


@pytest.fixture(scope="module")
def roomy_2507_1m() -> Limits:
    """The same with Qwen's config_1m.json: dual chunk attention on, 1,010,000 positions."""
    return config_limits(fixture_config("config_1m-Qwen3-30B-A3B-2507.json"), 17 * GB, dtype_bytes=2,
                         memory_budget=1000 * GB)


def test_the_2507_models_native_context_is_262144_with_or_without_the_1m_config(roomy_2507, roomy_2507_1m):
    assert roomy_2507.native_context == roomy_2507_1m.native_context == 262144


@pytest.mark.parametrize("context, strategy", [
    (262144, SINGLE_PASS), (262145, DUAL_CHUNK), (1010000, DUAL_CHUNK), (1010001, MAP_REDUCE),
])
def test_a_2507_model_with_dual_chunk_attention_reads_past_262k_without_yarn(roomy_2507_1m, context, strategy):
    plan = choose_strategy(context - ANSWER, ANSWER, roomy_2507_1m)
    assert (plan.strategy, plan.yarn_factor) == (strategy, None)


def test_a_2507_model_without_dual_chunk_attention_is_never_given_yarn(roomy_2507):
    assert choose_strategy(262144 - ANSWER, ANSWER, roomy_2507).strategy == SINGLE_PASS
    plan = choose_strategy(262145 - ANSWER, ANSWER, roomy_2507)
    assert (plan.strategy, plan.yarn_factor) == (MAP_REDUCE, None)
    assert "--dual-chunk" in plan.describe()


def test_a_million_tokens_on_a_2507_model_need_an_8bit_cache_on_a_96_gb_mac_and_say_what_fits():
    config = fixture_config("config_1m-Qwen3-30B-A3B-2507.json")
    plan = choose_strategy(1_000_000 - ANSWER, ANSWER, config_limits(config, 17 * GB, 2, 96 * GiB))
    assert (plan.strategy, plan.kv_bits) == (DUAL_CHUNK, 8)  # 96 KiB a token in bf16 is ~100 GB, 8-bit about half
    plan = choose_strategy(1_000_000 - ANSWER, ANSWER, config_limits(config, 17 * GB, 2, 48 * GiB))
    assert plan.strategy == MAP_REDUCE and 0 < plan.fits_tokens < 1_000_000
    assert f"{plan.fits_tokens:,} tokens fit in this memory" in plan.describe()


def test_the_dual_chunk_plan_says_which_and_why(roomy_2507_1m):
    assert "dual chunk attention (Qwen's way past the window of the 2507 models)" in \
        choose_strategy(500_000, ANSWER, roomy_2507_1m).describe()
