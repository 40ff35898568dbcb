"""Structure-aware splitting: exact slices in order, within budget, at the coarsest boundary that works."""

import re

import pytest

from qwenmlx.splitting import split_text
from qwenmlx.tokenizer import Tokenizer
from tests.documents import ALL_DOCUMENTS, CHINESE, ENGLISH_MOE

# A part may end after a sentence end, a line break or a CJK full stop: anything else is a cut mid-sentence.
SENTENCE_END = re.compile(r"([.!?…:][\"'”’)\]]*\s+|[。！？；][”’」』）]*\s*|\n\s*)$")


@pytest.fixture(scope="module")
def count_tokens(qwen_tokenizer_dir):
    tokenizer = Tokenizer.from_dir(qwen_tokenizer_dir)
    return lambda text: len(tokenizer.encode(text))


@pytest.mark.parametrize("budget", [60, 200, 700])
@pytest.mark.parametrize("path", ALL_DOCUMENTS, ids=lambda p: p.name)
def test_parts_are_the_whole_text_in_order_each_within_budget(path, budget, count_tokens):
    text = path.read_text(encoding="utf-8")
    parts = split_text(text, budget, count_tokens)
    assert "".join(parts) == text
    assert all(count_tokens(part) <= budget for part in parts)
    assert len(parts) > count_tokens(text) // budget


@pytest.mark.parametrize("budget", [120, 200, 700])  # 120: more than the longest sentence
@pytest.mark.parametrize("path", ALL_DOCUMENTS, ids=lambda p: p.name)
def test_no_part_ends_mid_sentence(path, budget, count_tokens):
    parts = split_text(path.read_text(encoding="utf-8"), budget, count_tokens)
    for part in parts[:-1]:
        assert SENTENCE_END.search(part), part[-80:]


def test_sections_that_fit_become_parts_of_their_own(count_tokens):
    text = ENGLISH_MOE.read_text(encoding="utf-8")
    sections = re.split(r"(?m)^(?=## )", text)
    budget = max(count_tokens(s) for s in sections)
    parts = split_text(text, budget, count_tokens)
    assert all(part.startswith("#") for part in parts)
    assert len(parts) < len(sections)  # small neighbouring sections share a part


def test_a_text_within_budget_is_one_part(count_tokens):
    text = CHINESE.read_text(encoding="utf-8")
    assert split_text(text, count_tokens(text), count_tokens) == [text]


def test_chinese_is_cut_after_full_stops_without_spaces(count_tokens):
    paragraph = max(CHINESE.read_text(encoding="utf-8").split("\n\n"), key=len)
    parts = split_text(paragraph, count_tokens(paragraph) // 3, count_tokens)
    assert len(parts) >= 3
    assert all(part.endswith(("。", "；", "！", "？")) for part in parts[:-1])


def test_an_overlong_sentence_is_cut_between_words(count_tokens):
    sentence = "The router picks eight of the one hundred and twenty eight experts for every token " * 20
    parts = split_text(sentence, 50, count_tokens)
    assert "".join(parts) == sentence
    assert all(count_tokens(p) <= 50 and p.endswith(" ") for p in parts[:-1])


def test_an_unbroken_run_is_cut_between_characters(count_tokens):
    run = "0123456789abcdef" * 200
    parts = split_text(run, 40, count_tokens)
    assert "".join(parts) == run
    assert all(count_tokens(p) <= 40 for p in parts)


def test_budget_must_be_positive(count_tokens):
    with pytest.raises(ValueError):
        split_text("text", 0, count_tokens)
