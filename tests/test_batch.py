"""Several sequences decoded in one forward pass: each sequence's logits equal its logits alone."""

import mlx.core as mx
import numpy as np
import pytest

from qwenmlx.batch import decode_step
from qwenmlx.cache import copy_caches, make_cache
from qwenmlx.checkpoint import load_model

LOGITS_ATOL = 1e-4  # float32 on both sides; what is left is the summation order inside a matmul
STEPS = 4


def prefilled(model, lengths: list[int], **cache_settings) -> tuple[list[list], list[int]]:
    """Per sequence: caches holding a random prompt of that length but its last token, and that last token."""
    caches, last = [], []
    for seed, length in enumerate(lengths):
        tokens = np.random.default_rng(seed).integers(0, 151_000, length).tolist()
        cache = make_cache(model, **cache_settings)
        model(mx.array(tokens[:-1])[None], cache)
        caches.append(cache)
        last.append(tokens[-1])
    return caches, last


def alone(model, token: int, cache: list) -> mx.array:
    return model(mx.array([[token]]), cache)[:, -1, :]


@pytest.mark.parametrize("variant, lengths, cache_settings", [
    ("moe", [5, 17, 40, 23], {}),
    ("dense", [5, 17, 40, 23], {}),
    ("moe", [30, 9, 12, 33], {"max_kv_size": 16}),  # rotating caches, some evicting during the steps
    ("moe", [3 + i for i in range(40)], {}),  # a batch of 40: 80 (token, expert) pairs over 8 experts
])
def test_a_sequences_logits_in_a_batch_equal_its_logits_alone_step_after_step(checkpoint_dir, variant, lengths,
                                                                              cache_settings):
    model, _ = load_model(checkpoint_dir(variant))
    batch_caches, tokens = prefilled(model, lengths, **cache_settings)
    single_caches = [copy_caches(c) for c in batch_caches]
    for _ in range(STEPS):
        batched = np.array(decode_step(model, tokens, batch_caches))
        singles = np.concatenate([np.array(alone(model, t, c)) for t, c in zip(tokens, single_caches)])
        np.testing.assert_allclose(batched, singles, atol=LOGITS_ATOL, rtol=0)
        tokens = singles.argmax(axis=-1).tolist()
    for batch, single in zip(batch_caches, single_caches):
        assert [(c.offset, c.evicted) for c in batch] == [(c.offset, c.evicted) for c in single]
