"""The growing, rotating and quantized KV caches: equal where they should be, bounded where they must be."""

import mlx.core as mx
import numpy as np
import pytest

from qwenmlx.cache import KVCache, RotatingKVCache, load_caches, make_cache, quantized_attention, save_caches
from qwenmlx.checkpoint import load_model
from qwenmlx.errors import QwenMLXError
from qwenmlx.rope import RoPE

ATOL = 1e-4


@pytest.fixture(scope="session")
def model(moe_dir):
    return load_model(moe_dir)[0]


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 151_000, n).tolist()


def run(model, cache, ids: list[int], step: int) -> np.ndarray:
    """Logits of every token, fed `step` tokens at a time through the cache."""
    out = [np.array(model(mx.array(ids[i : i + step])[None], cache)) for i in range(0, len(ids), step)]
    return np.concatenate(out, axis=1)


def test_rotating_cache_under_capacity_is_the_growing_cache(model):
    ids = tokens(60)
    growing = run(model, make_cache(model), ids, 13)
    np.testing.assert_array_equal(run(model, make_cache(model, max_kv_size=64), ids, 13), growing)


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_rotating_cache_prefill_chunks_crossing_the_boundary_match_single_step_decode(model, kv_bits):
    ids = tokens(60, seed=1)
    one_by_one = run(model, make_cache(model, max_kv_size=20, kv_bits=kv_bits), ids, 1)
    for step in (7, 25):  # a chunk longer than the window too
        cache = make_cache(model, max_kv_size=20, kv_bits=kv_bits)
        np.testing.assert_allclose(run(model, cache, ids, step), one_by_one, atol=ATOL, rtol=0)
        assert cache[0].evicted > 0 and cache[0].offset <= 20


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_rotating_cache_memory_stays_flat_and_logits_finite_past_ten_times_its_capacity(model, kv_bits):
    cache = make_cache(model, max_kv_size=32, kv_bits=kv_bits)
    sizes = []
    for i in range(33):  # 330 tokens
        logits = model(mx.array(tokens(10, seed=i))[None], cache)
        assert np.isfinite(np.array(logits)).all()
        assert all(c.offset <= 32 for c in cache)  # positions stay below the window
        sizes.append(sum(c.nbytes for c in cache))
    assert cache[0].evicted >= 330 - 32
    assert len(set(sizes[4:])) == 1  # full after 32 tokens, then not a byte more


def test_re_rotation_equals_rope_at_the_new_positions_of_the_same_keys():
    rope = RoPE(32, 1_000_000.0, None, 4096)
    cache = RotatingKVCache(max_size=10, keep=2, evict=3)
    rng = np.random.default_rng(0)
    raw_keys = mx.array(rng.standard_normal((1, 2, 23, 32)), dtype=mx.float32)  # before RoPE
    held = []
    for i in range(23):
        if cache.offset == 10:  # evicts tokens 2..4 of what is held
            held = held[:2] + held[5:]
        key = raw_keys[:, :, i : i + 1]
        # As attention does: rotate at the next position; the cache moves it if it evicts first.
        cache.attend(mx.zeros((1, 4, 1, 32)), rope(key, cache.offset), key, 1.0, rope)
        held.append(i)
    expected = rope(raw_keys[:, :, held], 0)  # contiguous positions 0..len-1
    assert cache.offset == len(held) and held[:2] == [0, 1]
    np.testing.assert_allclose(np.array(cache.state[0]), np.array(expected), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(cache.state[1]), np.array(raw_keys[:, :, held]), atol=0, rtol=0)


@pytest.mark.parametrize("max_kv_size", [None, 24])
def test_trim_then_feed_equals_never_having_fed_even_after_the_window_wrapped(model, max_kv_size):
    cache, reference = make_cache(model, max_kv_size=max_kv_size), make_cache(model, max_kv_size=max_kv_size)
    for c in (cache, reference):
        run(model, c, tokens(37, seed=2), 8)  # wraps a window of 24
    n_dropped = 24 - cache[0].offset if max_kv_size else 7  # what fits without evicting again
    run(model, cache, tokens(n_dropped, seed=3), 2)
    assert all(c.trim(n_dropped) == n_dropped for c in cache)
    new = tokens(9, seed=4)
    np.testing.assert_allclose(run(model, cache, new, 3), run(model, reference, new, 3), atol=ATOL, rtol=0)


def test_quantized_attention_equals_float_attention_over_the_dequantized_keys_and_values():
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal(shape), dtype=mx.float32)
               for shape in [(1, 4, 5, 64), (1, 2, 9, 64), (1, 2, 9, 64)])
    for bits in (8, 4):
        qk, qv = mx.quantize(k, 64, bits), mx.quantize(v, 64, bits)
        dk, dv = (mx.dequantize(*x, group_size=64, bits=bits) for x in (qk, qv))
        expected = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.2, mask="causal")
        got = quantized_attention(q, qk, qv, 0.2, "causal", 64, bits)
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5, rtol=0)


# Relative error of all logits of the tiny random model (sharper than a trained one) over a 64-token prompt.
@pytest.mark.parametrize("kv_bits, max_relative_error", [(8, 0.1), (4, 0.5)])
def test_quantized_cache_stays_close_to_the_float_cache_in_a_fraction_of_the_memory(model, kv_bits,
                                                                                    max_relative_error):
    ids = tokens(64, seed=5)
    exact = run(model, make_cache(model), ids, 16)
    quantized = run(model, make_cache(model, kv_bits=kv_bits), ids, 16)
    assert np.linalg.norm(quantized - exact) / np.linalg.norm(exact) < max_relative_error
    float_bytes = sum(c.nbytes for c in make_filled(model, None, ids))
    assert sum(c.nbytes for c in make_filled(model, kv_bits, ids)) < float_bytes * (kv_bits + 4) / 32


def make_filled(model, kv_bits, ids):
    cache = make_cache(model, kv_bits=kv_bits)
    model(mx.array(ids)[None], cache)
    mx.eval([c.state for c in cache])
    return cache


def test_quantized_cache_rejects_unsupported_bits():
    with pytest.raises(QwenMLXError, match="--kv-bits 3"):
        KVCache(bits=3)


@pytest.mark.parametrize("max_kv_size, kv_bits", [(None, None), (24, None), (24, 8), (None, 4)])
def test_saved_and_loaded_cache_continues_exactly_as_the_original(model, tmp_path, max_kv_size, kv_bits):
    cache = make_cache(model, max_kv_size=max_kv_size, kv_bits=kv_bits)
    run(model, cache, tokens(50, seed=6), 10)
    path = tmp_path / "cache.safetensors"
    save_caches(path, cache, {"tokens": [1, 2, 3]})
    loaded, metadata = load_caches(path)
    assert metadata == {"tokens": [1, 2, 3]}
    assert [c.describe() for c in loaded] == [c.describe() for c in cache]
    following = tokens(30, seed=7)
    np.testing.assert_array_equal(run(model, loaded, following, 1), run(model, cache, following, 1))


def test_loading_a_file_that_is_not_a_cache_names_it(tmp_path):
    path = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(path), {"x": mx.zeros((2,))})
    with pytest.raises(QwenMLXError, match="weights.safetensors: not a qwenmlx KV cache"):
        load_caches(path)
    with pytest.raises(QwenMLXError, match="missing.safetensors: no such file"):
        load_caches(tmp_path / "missing.safetensors")


def test_a_cache_file_missing_arrays_its_header_describes_names_it(model, tmp_path):
    cache = make_cache(model)
    run(model, cache, tokens(5), 5)
    path = tmp_path / "cache.safetensors"
    save_caches(path, cache)
    arrays, header = mx.load(str(path), return_metadata=True)
    del arrays["2.1"]
    mx.save_safetensors(str(path), arrays, metadata=header)
    with pytest.raises(QwenMLXError, match="cache.safetensors: not a qwenmlx KV cache file"):
        load_caches(path)
