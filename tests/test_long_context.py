"""Attention past the trained window (attention.py) against numpy references written from its authors' code."""

from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from qwenmlx.attention import DualChunkAttention
from qwenmlx.cache import make_cache
from qwenmlx.checkpoint import load_model
from qwenmlx.config import QWEN_DUAL_CHUNK
from qwenmlx.errors import QwenMLXError
from tests import long_context_reference as ref
from tests.checkpoints import MODEL_VARIANTS, checkpoint_variant

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


def test_self_extend_keys_are_not_at_their_index_so_the_rotating_cache_is_refused(moe_dir):
    model, _ = load_model(moe_dir, self_extend={"group_size": 4, "window": 16})
    assert all(not c.rotated_keys for c in make_cache(model))
    with pytest.raises(QwenMLXError, match="--max-kv-size"):
        make_cache(model, max_kv_size=64)


@pytest.mark.parametrize("method", ["self_extend", "dual_chunk"])
def test_attention_past_the_window_over_an_8_bit_cache_stays_near_the_float_cache(moe_dir, dual_chunk_dir, method):
    if method == "self_extend":
        model, _ = load_model(moe_dir, self_extend={"group_size": 4, "window": 16})
    else:
        model, _ = load_model(dual_chunk_dir("moe"))
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


# Dual chunk attention on the tiny models: chunks of 16 (chunk_size 24, local_size 8), scaled past 32 tokens.
DUAL_CHUNK = {"chunk_size": 24, "local_size": 8, "original_max_position_embeddings": 32}


def dual_chunk_reference(q, k, v, scale, *, theta, prompt_length=None):
    return ref.dual_chunk_attention(q, k, v, theta, scale, DUAL_CHUNK["chunk_size"], DUAL_CHUNK["local_size"],
                                    DUAL_CHUNK["original_max_position_embeddings"], prompt_length)


def test_dual_chunk_reference_is_plain_causal_rope_attention_within_one_chunk_and_the_trained_length():
    q, k, v = random_qkv(40)
    plain = ref.causal_rope_attention(q, k, v, THETA, 32**-0.5)
    np.testing.assert_allclose(ref.dual_chunk_attention(q, k, v, THETA, 32**-0.5, 48, 8, 64), plain, atol=1e-12)


def test_dual_chunk_reference_keeps_the_first_chunk_and_changes_the_rest():
    q, k, v = random_qkv(40)
    plain = ref.causal_rope_attention(q, k, v, THETA, 32**-0.5)
    chunked = ref.dual_chunk_attention(q, k, v, THETA, 32**-0.5, 24, 8, 0)
    np.testing.assert_allclose(chunked[:, :, :16], plain[:, :, :16], atol=1e-12)
    assert np.abs(chunked[:, :, 16:] - plain[:, :, 16:]).max() > 1e-3


@pytest.fixture(scope="module")
def dual_chunk_dir(checkpoint_dir, tmp_path_factory):
    """variant -> a copy of the tiny checkpoint whose config.json carries DUAL_CHUNK, as Qwen's config_1m.json does."""
    dirs = {}

    def get(variant: str):
        if variant not in dirs:
            dirs[variant] = checkpoint_variant(checkpoint_dir(variant), tmp_path_factory.mktemp(variant) / "model",
                                               {"config.json": {"dual_chunk_attention_config": DUAL_CHUNK}})
        return dirs[variant]

    return get


def dual_chunk_logits(model_dir, tokens, variant, prompt_length=None):
    attention = partial(dual_chunk_reference, theta=MODEL_VARIANTS[variant]["rope_theta"], prompt_length=prompt_length)
    return ref.reference_logits(model_dir, tokens, attention)


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_dual_chunk_prefill_matches_vllm_reference(dual_chunk_dir, variant):
    model_dir = dual_chunk_dir(variant)
    model, _ = load_model(model_dir)
    np.testing.assert_allclose(np.array(model(mx.array(prompt()))), dual_chunk_logits(model_dir, prompt(), variant),
                               atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_dual_chunk_chunked_prefill_and_cached_decode_match_vllm_reference(dual_chunk_dir, variant):
    model_dir = dual_chunk_dir(variant)
    model, _ = load_model(model_dir)
    tokens, prompt_len, cache = prompt(), 80, make_cache(model)
    for c in cache:
        c.prompt_end = prompt_len  # what generate sets before its chunked prefill
    steps = [np.array(model(mx.array(tokens[:, :30]), cache)), np.array(model(mx.array(tokens[:, 30:prompt_len]), cache))]
    for t in range(prompt_len, tokens.shape[1]):
        steps.append(np.array(model(mx.array(tokens[:, t : t + 1]), cache)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), dual_chunk_logits(model_dir, tokens, variant, prompt_len),
                               atol=LOGITS_ATOL, rtol=0)


def test_dual_chunk_keys_are_not_at_their_index_so_the_rotating_cache_is_refused(dual_chunk_dir):
    model, _ = load_model(dual_chunk_dir("moe"))
    assert all(not c.rotated_keys for c in make_cache(model))
    with pytest.raises(QwenMLXError, match="--max-kv-size"):
        make_cache(model, max_kv_size=64)


@pytest.mark.parametrize("section, says", [
    ({"chunk_size": 8, "local_size": 8, "original_max_position_embeddings": 32}, "chunk_size > local_size"),
    ({"chunk_size": 24, "original_max_position_embeddings": 32}, "needs whole numbers"),
    ([24, 8], "must be an object"),
])
def test_a_bad_dual_chunk_attention_config_names_the_field(moe_dir, tmp_path, section, says):
    model_dir = checkpoint_variant(moe_dir, tmp_path / "model", {"config.json": {"dual_chunk_attention_config": section}})
    with pytest.raises(QwenMLXError, match=f"dual_chunk_attention_config.*{says}"):
        load_model(model_dir)


def test_dual_chunk_attention_and_yarn_together_are_refused(moe_dir, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    model_dir = checkpoint_variant(moe_dir, tmp_path / "model", {"config.json": {
        "dual_chunk_attention_config": DUAL_CHUNK, "rope_scaling": yarn}})
    with pytest.raises(QwenMLXError, match="rope_scaling"):
        load_model(model_dir)


def test_generate_scales_every_prefill_chunk_by_the_whole_prompt(dual_chunk_dir):
    from qwenmlx.generate import generate_tokens

    model, _ = load_model(dual_chunk_dir("moe"))
    tokens = prompt()[0].tolist()

    def first_logprobs(prefill_step: int) -> np.ndarray:
        logprobs = []
        next(generate_tokens(model, tokens, max_tokens=1, prefill_step=prefill_step, logprobs=logprobs))
        return np.array(logprobs[0])

    np.testing.assert_allclose(first_logprobs(16), first_logprobs(len(tokens)), atol=LOGITS_ATOL, rtol=0)


@pytest.fixture(scope="module")
def model_2507_dir(checkpoint_dir, tmp_path_factory):
    """The tiny MoE checkpoint with the 2507 models' window: 262,144 positions, theta 10,000,000."""
    return checkpoint_variant(checkpoint_dir("moe"), tmp_path_factory.mktemp("2507") / "model",
                              {"config.json": {"max_position_embeddings": 262144, "rope_theta": 10_000_000.0}})


def test_dual_chunk_on_a_2507_model_applies_qwens_1m_settings_and_is_plain_attention_within_a_chunk(model_2507_dir):
    plain, _ = load_model(model_2507_dir)
    model, _ = load_model(model_2507_dir, dual_chunk=True)
    assert model.config.dual_chunk_attention_config == QWEN_DUAL_CHUNK
    assert model.config.max_position_embeddings == 1010000
    assert isinstance(model.layers[0].self_attn, DualChunkAttention)
    tokens = mx.array(prompt())
    np.testing.assert_allclose(np.array(model(tokens)), np.array(plain(tokens)), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("method", ["self_extend", "dual_chunk"])
def test_attending_the_queries_in_small_blocks_changes_nothing(moe_dir, dual_chunk_dir, method, monkeypatch):
    import qwenmlx.attention

    if method == "self_extend":
        model, _ = load_model(moe_dir, self_extend={"group_size": 4, "window": 16})
    else:
        model, _ = load_model(dual_chunk_dir("moe"))
    tokens = mx.array(prompt())
    whole = np.array(model(tokens))
    monkeypatch.setattr(qwenmlx.attention, "SCORE_BLOCK_BYTES", 4 * 4 * 4 * PROMPT_LEN * 7)  # 7 rows a block
    np.testing.assert_allclose(np.array(model(tokens)), whole, atol=1e-5, rtol=0)


def test_info_shows_dual_chunk_attention_and_yarn_cannot_be_added_to_it(dual_chunk_dir):
    from qwenmlx.checkpoint import describe_model

    assert describe_model(dual_chunk_dir("moe"))["dual_chunk_attention"] == DUAL_CHUNK
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}
    with pytest.raises(QwenMLXError, match="YaRN cannot be added"):
        load_model(dual_chunk_dir("moe"), rope_scaling=yarn)


# Sparse prefill: MInference's vertical-slash patterns inside dual chunk attention's prefill.


def sparse_index_case(n: int, N: int, seed: int = 0):
    """Attention weights of the last n queries over N keys (causal in the last n columns), as the choice sees them."""
    scores = np.random.default_rng(seed).standard_normal((4, n, N)).astype(np.float32) * 3
    scores = np.where(np.arange(N)[None] <= np.arange(N - n, N)[:, None], scores, -np.inf)
    return ref.softmax(scores)


@pytest.mark.parametrize("n, N, vertical, slash", [(64, 400, [40, 130, 31, 400], [120, 150, 101, 400]),
                                                   (1, 300, [50] * 4, [110] * 4), (16, 160, [35] * 4, [105] * 4)])
def test_sparse_index_choice_matches_vllms(n, N, vertical, slash):
    from qwenmlx.attention import vertical_slash_indices

    weights = sparse_index_case(n, N)
    columns, distances = vertical_slash_indices(mx.array(weights), vertical, slash)
    expected_columns, expected_distances = ref.vertical_slash_indices(weights, vertical, slash)
    for head in range(4):
        assert set(np.array(columns[head]).tolist()) - {-1} == expected_columns[head]
        assert set(np.array(distances[head]).tolist()) - {-1} == expected_distances[head]
        assert len(expected_columns[head]) == min(vertical[head], N)
        assert set(range(30)) <= expected_columns[head] and set(range(100)) <= expected_distances[head]


def sparse_settings(vertical: int, slash: int) -> dict:
    """DUAL_CHUNK with every head of every layer on one vertical-slash pattern, sparse at any length."""
    shape = MODEL_VARIANTS["moe"]
    pattern = {str(h): ["vertical_and_slash", vertical, slash, 0.9] for h in range(shape["num_attention_heads"])}
    return {**DUAL_CHUNK, "sparse_attention_config": [pattern] * shape["num_hidden_layers"], "sparse_attention_threshold": 0,
            "sparse_attention_last_q": 8}


@pytest.fixture(scope="module")
def sparse_dir(checkpoint_dir, tmp_path_factory):
    """(vertical, slash) -> the tiny MoE checkpoint with DUAL_CHUNK and that sparse pattern on every head."""
    dirs = {}

    def get(vertical: int, slash: int):
        if (vertical, slash) not in dirs:
            dirs[vertical, slash] = checkpoint_variant(
                checkpoint_dir("moe"), tmp_path_factory.mktemp("sparse") / "model",
                {"config.json": {"dual_chunk_attention_config": sparse_settings(vertical, slash)}})
        return dirs[vertical, slash]

    return get


def test_sparse_prefill_keeping_every_index_is_dense_dual_chunk_attention(sparse_dir):
    dense, _ = load_model(sparse_dir(1000, 1000))
    sparse, _ = load_model(sparse_dir(1000, 1000), sparse_prefill=True)
    tokens = mx.array(prompt())
    np.testing.assert_allclose(np.array(sparse(tokens)), np.array(dense(tokens)), atol=LOGITS_ATOL, rtol=0)


def test_sparse_prefill_matches_vllm_reference(sparse_dir):
    """31 columns and 101 distances over 160 tokens (chunks of 16): some keys of every late query are left out."""
    model_dir, tokens = sparse_dir(31, 101), prompt(PROMPT_LEN + 64)
    model, _ = load_model(model_dir, sparse_prefill=True)

    def attention(q, k, v, scale):
        return ref.dual_chunk_attention(q, k, v, MODEL_VARIANTS["moe"]["rope_theta"], scale, DUAL_CHUNK["chunk_size"],
                                        DUAL_CHUNK["local_size"], DUAL_CHUNK["original_max_position_embeddings"],
                                        sparse=(31, 101, 8))

    np.testing.assert_allclose(np.array(model(mx.array(tokens))), ref.reference_logits(model_dir, tokens, attention),
                               atol=LOGITS_ATOL, rtol=0)


def test_sparse_prefill_with_few_indices_changes_the_prefill_but_not_decode(sparse_dir):
    dense, _ = load_model(sparse_dir(31, 101))
    sparse, _ = load_model(sparse_dir(31, 101), sparse_prefill=True)
    # 96 tokens: a few keys past the first 30 columns and 100 distances, so some keys are left out
    tokens = mx.array(prompt(PROMPT_LEN + 64))
    assert np.abs(np.array(sparse(tokens)) - np.array(dense(tokens))).max() > 1e-3
    caches = make_cache(sparse), make_cache(dense)
    steps = [np.array(m(tokens[:, :1], c)) for m, c in zip((sparse, dense), caches)]
    np.testing.assert_allclose(steps[0], steps[1], atol=LOGITS_ATOL, rtol=0)  # one query: a decode step is dense


@pytest.mark.parametrize("heads, kv_heads, chunk_size, local_size, length, vertical, slash, prefill_ends", [
    (4, 4, 24, 8, 200, 31, 101, [200]),  # chunks of 16: many chunks, each past the first in three regions
    (8, 2, 24, 8, 200, 40, 120, [32, 200]),  # GQA; the first two chunks, then the rest through the cache
    (6, 3, 160, 32, 330, 31, 120, [128, 330]),  # chunks of 128: several query blocks in a chunk, the first alone
])
def test_sparse_prefill_gathering_only_the_kept_keys_equals_the_masked_vllm_reference(
        heads, kv_heads, chunk_size, local_size, length, vertical, slash, prefill_ends):
    """The sparse prefill scores each block of queries against the keys its pattern keeps, not the whole context:
    the outputs are those of the reference's dense score maps masked to the same pattern."""
    from qwenmlx.attention import SparsePrefill
    from qwenmlx.cache import KVCache
    from qwenmlx.config import config_from_dict

    config = config_from_dict(dict(MODEL_VARIANTS["moe"], num_attention_heads=heads, num_key_value_heads=kv_heads))
    original_max, last_q = 64, 8
    attention = DualChunkAttention(config, chunk_size, local_size, original_max,
                                   SparsePrefill([vertical] * heads, [slash] * heads, threshold=0, last_q=last_q))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, length, 32)).astype(np.float32) for n in (heads, kv_heads, kv_heads))
    cache, outputs, start = KVCache(rotated_keys=False), [], 0
    cache.prompt_end = length
    for end in prefill_ends:
        qk = mx.array(np.concatenate([q[:, :, start:end], k[:, :, start:end]], axis=1))
        outputs.append(np.array(attention.attend(qk, mx.array(v[:, :, start:end]), cache)))
        start = end
    expected = ref.dual_chunk_attention(q, k, v, config.rope_theta, attention.scale, chunk_size, local_size,
                                        original_max, sparse=(vertical, slash, last_q))
    np.testing.assert_allclose(np.concatenate(outputs, axis=2), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, says", [
    ({"sparse_attention_config": None}, "has none"),
    ({"sparse_attention_config": [{"0": ["vertical_and_slash", 10, 10, 1]}] * 3}, "each of the 4 query heads"),
    ({"sparse_attention_config": [{str(h): ["a_shape", 10, 10, 1] for h in range(4)}] * 3}, r"\[0\]\[0\] must be"),
    ({"sparse_attention_config": [{str(h): ["vertical_and_slash", 10, 10, 1] for h in range(4)}]}, r"\[1\] must give"),
    ({"sparse_attention_last_q": 0}, "sparse_attention_last_q >= 1"),
    ({"sparse_attention_threshold": "32K"}, "sparse_attention_threshold must be"),
])
def test_sparse_prefill_refuses_a_config_without_its_patterns(checkpoint_dir, tmp_path, change, says):
    settings = {**sparse_settings(100, 100), **change}
    model_dir = checkpoint_variant(checkpoint_dir("moe"), tmp_path / "model",
                                   {"config.json": {"dual_chunk_attention_config": settings}})
    with pytest.raises(QwenMLXError, match=says):
        load_model(model_dir, sparse_prefill=True)


def test_sparse_prefill_needs_dual_chunk_attention(moe_dir):
    with pytest.raises(QwenMLXError, match="--sparse-prefill is part of dual chunk attention"):
        load_model(moe_dir, sparse_prefill=True)
