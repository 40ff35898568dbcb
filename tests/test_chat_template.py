"""Chat templates are foreign code: whatever one does wrong, or however long or large it would grow, is one line."""

import pytest

import qwenmlx.chat_template as chat_template_module
from qwenmlx.chat_template import ChatTemplate
from qwenmlx.tokenizer import Tokenizer
from tests.errors import one_line_error

MESSAGES = [{"role": "user", "content": "hi"}]
LOOP = "{% for m in messages %}{{ m.content }}{% endfor %}"


def render(source: str) -> str:
    return ChatTemplate(source).render(messages=MESSAGES)


# Ways past the limits that go around the operators the CLI table tries.
UNBOUNDED = {
    "replace-with-a-long-string": "{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}",
    "join-of-many-copies": "{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|join }}",
    "join-of-a-list-grown-in-a-loop": "{% set s = 'x' * 1000000 %}{% set ns = namespace(l=[]) %}"
                                      "{% for i in range(1000) %}{% set ns.l = ns.l + [s] %}{% endfor %}{{ ns.l|join }}",
    "indent-of-many-lines": "{% set s = 'x\n' * 100000 %}{{ s|indent(100000) }}",
    "format-width-given-as-an-argument": "{{ '{:>{}}'.format(1, 10000000000) }}",
    "format-width-written-in-the-string": "{{ '{:>10000000000}'.format(1) }}",
    "percent-width-given-as-an-argument": "{{ '%*d' % (10000000000, 1) }}",
    "tojson-indent": "{{ messages|tojson(indent=10000000000) }}",
    "integer-squared-again-and-again": "{% set ns = namespace(x=3) %}{% for i in range(100) %}"
                                       "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "power-tower": "{{ 10 ** 10 ** 10 }}",
    "block-set-doubling": "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(60) %}"
                          "{% set b %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = b %}{% endfor %}",
    "filter-block-of-nested-loops": "{% filter upper %}{% for i in range(100000) %}{% for j in range(1000) %}"
                                    "aaaaaaaa{% endfor %}{% endfor %}{% endfilter %}",
    "recursive-loop": "{% for i in range(3) recursive %}{{ loop(range(100000)) }}{% endfor %}",
}


@pytest.mark.parametrize("source", UNBOUNDED.values(), ids=UNBOUNDED.keys())
def test_a_template_that_would_grow_or_run_without_end_is_stopped(source):
    assert one_line_error(render, source).startswith("chat template: ")


def test_a_render_past_the_time_limit_is_stopped(monkeypatch):
    template = ChatTemplate(LOOP)
    monkeypatch.setattr(chat_template_module, "MAX_SECONDS", 0.0)
    assert one_line_error(lambda: template.render(messages=MESSAGES)) == "chat template: stopped after 0 s of rendering"


def test_the_limits_hold_for_each_render_not_for_the_template(monkeypatch):
    monkeypatch.setattr(chat_template_module, "MAX_LOOP_STEPS", 3)
    template = ChatTemplate(LOOP)
    for _ in range(5):
        assert template.render(messages=MESSAGES * 3) == "hi" * 3
    assert "loop steps" in one_line_error(lambda: template.render(messages=MESSAGES * 4))


def test_a_template_error_names_the_line():
    assert one_line_error(render, "line one\n{{ messages[0].content }\n") == (
        "chat template: line 2: unexpected '}'")


def test_raise_exception_in_a_template_is_its_message():
    assert one_line_error(render, "{{ raise_exception('only user and assistant roles') }}") == (
        "chat template: only user and assistant roles")


def test_qwen_template_renders_a_document_near_the_size_limit_and_a_long_chat(qwen_tokenizer_dir):
    tokenizer = Tokenizer.from_dir(qwen_tokenizer_dir)
    document = "A line of a long document, with some words in it.\n" * 200_000  # 10 million characters
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": document + "Summarize."}])
    assert document in prompt
    chat = [{"role": role, "content": f"message {i}"} for i in range(10_000) for role in ("user", "assistant")]
    assert tokenizer.apply_chat_template(chat + MESSAGES).count("<|im_start|>") == 20_002
