"""Counting tokens in bounded pieces: span counts equal tokenising the span, and no call is long."""

import random

import pytest

from qwenmlx import token_counts
from qwenmlx.token_counts import MAX_PIECE_CHARS, TokenCounts
from qwenmlx.tokenizer import Tokenizer
from tests.documents import ALL_DOCUMENTS
from tests.spy_tokenizer import EncodeSpy


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return Tokenizer.from_dir(qwen_tokenizer_dir)


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of about 64 characters, so that the bundled articles are many of them."""
    monkeypatch.setattr(token_counts, "PIECE_CHARS", 64)
    monkeypatch.setattr(token_counts, "MAX_PIECE_CHARS", 512)


@pytest.mark.parametrize("path", ALL_DOCUMENTS, ids=lambda p: p.name)
def test_a_span_counts_as_many_tokens_as_tokenising_it(tokenizer, path, small_pieces):
    text = path.read_text(encoding="utf-8")
    progress = []
    counts = TokenCounts(tokenizer, text, lambda done, total: progress.append((done, total)))
    assert len(progress) > 10 and progress[-1] == (len(text), len(text))
    assert counts.total == len(tokenizer.encode(text))
    rng = random.Random(0)
    for _ in range(300):
        start, end = sorted(rng.sample(range(len(text) + 1), 2))
        assert counts.count(start, end) == len(tokenizer.encode(text[start:end]))


@pytest.mark.parametrize("path", ALL_DOCUMENTS, ids=lambda p: p.name)
def test_no_span_past_the_reach_fits(tokenizer, path, small_pieces):
    text = path.read_text(encoding="utf-8")
    counts = TokenCounts(tokenizer, text)
    rng = random.Random(0)
    for _ in range(100):
        start, max_tokens = rng.randrange(len(text)), rng.randrange(1, 400)
        reach = counts.reach(start, max_tokens)
        assert reach == len(text) or counts.count(start, reach) > max_tokens


def test_a_run_without_safe_cuts_is_still_counted_in_bounded_pieces(tokenizer):
    run = "模型" * 20_000 + "abcdefgh" * 5_000  # no line break, no space
    spy = EncodeSpy(tokenizer)
    counts = TokenCounts(spy, run)
    assert max(spy.encoded_chars) <= MAX_PIECE_CHARS
    n_forced_cuts = len(spy.encoded_chars) - 1
    assert abs(counts.total - len(tokenizer.encode(run))) <= n_forced_cuts
