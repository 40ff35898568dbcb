"""Structure-aware splitting: exact slices in order, within budget, at the coarsest boundary that works."""

import re

import pytest

from qwenmlx.splitting import split_text
from qwenmlx.token_counts import TokenCounts
from qwenmlx.tokenizer import Tokenizer
from tests.documents import ALL_DOCUMENTS, CHINESE, ENGLISH_MOE

# A part may end after a sentence end, a line break or a CJK full stop: anything else is a cut mid-sentence.
SENTENCE_END = re.compile(r"([.!?…:][\"'”’)\]]*\s+|[。！？；][”’」』）]*\s*|\n\s*)$")


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return Tokenizer.from_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def count_tokens(tokenizer):
    return lambda text: len(tokenizer.encode(text))


@pytest.fixture(scope="module")
def split(tokenizer):
    return lambda text, budget: split_text(TokenCounts(tokenizer, text), budget)


@pytest.mark.parametrize("budget", [60, 200, 700])
@pytest.mark.parametrize("path", ALL_DOCUMENTS, ids=lambda p: p.name)
def test_parts_are_the_whole_text_in_order_each_within_budget(path, budget, count_tokens, split):
    text = path.read_text(encoding="utf-8")
    parts = split(text, budget)
    assert "".join(parts) == text
    assert all(count_tokens(part) <= budget for part in parts)
    assert len(parts) > count_tokens(text) // budget


@pytest.mark.parametrize("budget", [120, 200, 700])  # 120: more than the longest sentence
@pytest.mark.parametrize("path", ALL_DOCUMENTS, ids=lambda p: p.name)
def test_no_part_ends_mid_sentence(path, budget, split):
    parts = split(path.read_text(encoding="utf-8"), budget)
    for part in parts[:-1]:
        assert SENTENCE_END.search(part), part[-80:]


def test_sections_that_fit_become_parts_of_their_own(count_tokens, split):
    text = ENGLISH_MOE.read_text(encoding="utf-8")
    sections = re.split(r"(?m)^(?=## )", text)
    budget = max(count_tokens(s) for s in sections)
    parts = split(text, budget)
    assert all(part.startswith("#") for part in parts)
    assert len(parts) < len(sections)  # small neighbouring sections share a part


def test_a_text_within_budget_is_one_part(count_tokens, split):
    text = CHINESE.read_text(encoding="utf-8")
    assert split(text, count_tokens(text)) == [text]


def test_chinese_is_cut_after_full_stops_without_spaces(count_tokens, split):
    paragraph = max(CHINESE.read_text(encoding="utf-8").split("\n\n"), key=len)
    parts = split(paragraph, count_tokens(paragraph) // 3)
    assert len(parts) >= 3
    assert all(part.endswith(("。", "；", "！", "？")) for part in parts[:-1])


def test_an_overlong_sentence_is_cut_between_words(count_tokens, split):
    sentence = "The router picks eight of the one hundred and twenty eight experts for every token " * 20
    parts = split(sentence, 50)
    assert "".join(parts) == sentence
    assert all(count_tokens(p) <= 50 and p.endswith(" ") for p in parts[:-1])


def test_an_unbroken_run_is_cut_between_characters(count_tokens, split):
    run = "0123456789abcdef" * 200
    parts = split(run, 40)
    assert "".join(parts) == run
    assert all(count_tokens(p) <= 40 for p in parts)


def test_budget_must_be_positive(split):
    with pytest.raises(ValueError):
        split("text", 0)
