"""The chat library: history rendered by the template, prompt reuse equal to a fresh prefill, save/load, windows."""

import copy
import json

import mlx.core as mx
import pytest

from qwenmlx.chat import ChatSession
from qwenmlx.checkpoint import load
from qwenmlx.errors import QwenMLXError
from qwenmlx.generate import prefill

ANSWER_TOKENS = 12
# Two logits closer than this are a tie as far as float32 arithmetic in another order can tell.
NEAR_TIE = 1e-4


@pytest.fixture(scope="session")
def model_and_tokenizer(moe_dir):
    return load(moe_dir)


def greedy_session(model_and_tokenizer, **kwargs) -> ChatSession:
    return ChatSession(*model_and_tokenizer, temperature=0.0, max_tokens=ANSWER_TOKENS, **kwargs)


def say(session: ChatSession, text: str) -> list[int]:
    return [step.token for step in session.reply(text)]


def ask_and_check_against_fresh(model_and_tokenizer, session: ChatSession, text: str) -> list[int]:
    """Ask through the session (reusing its cache), then check each answer token is the greedy choice of the
    model run from scratch over the history and the answer so far (up to a near tie, which random weights
    may make)."""
    model, tokenizer = model_and_tokenizer
    answer = say(session, text)
    prompt = session.render(session.messages[:-1])  # the history the answer was given to
    logits = model(mx.array([prompt + answer[:-1]]))[0, len(prompt) - 1 :]
    chosen = mx.take_along_axis(logits, mx.array(answer)[:, None], axis=-1)[:, 0]
    assert (chosen >= logits.max(axis=-1) - NEAR_TIE).all().item()
    return answer


def test_prompt_reuse_across_turns_equals_a_fresh_prefill_with_thinking_on_and_off(model_and_tokenizer):
    session = greedy_session(model_and_tokenizer, system="You are terse.")
    tokenizer = model_and_tokenizer[1]
    for i, thinking in enumerate([True, False, False, True, True]):
        session.thinking = thinking
        # Everything up to the last question is the same tokens, whatever was answered to it.
        history = [{"role": "system", "content": session.system}] + session.messages[:-1]
        unchanged = len(tokenizer.apply_chat_template(history, add_generation_prompt=False, tokenize=True))
        ask_and_check_against_fresh(model_and_tokenizer, session, f"question {i}: why is the sky blue?")
        if i:
            assert session.last_turn.reused_tokens >= unchanged
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 5


def test_earlier_thinking_is_dropped_from_the_history_and_the_cache_is_trimmed_to_match(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    session = greedy_session(model_and_tokenizer)
    first = [{"role": "user", "content": "What is 2+2?"}]
    answer = "<think>\nTwo plus two is four.\n</think>\n\nFour."
    # The cache as generation left it: prompt, then the answer's tokens (the stop token never fed).
    fed = tokenizer.apply_chat_template(first, tokenize=True) + tokenizer.encode(answer)
    prefill(model, session.cache, fed)
    session.messages, session.cached_tokens = first + [{"role": "assistant", "content": answer}], fed
    rendered = tokenizer.decode(session.render(session.messages + [{"role": "user", "content": "And 3+3?"}]))
    assert "Two plus two" not in rendered and "<|im_start|>assistant\nFour.<|im_end|>\n" in rendered
    ask_and_check_against_fresh(model_and_tokenizer, session, "And 3+3?")
    assert session.last_turn.reused_tokens < len(fed) - len(tokenizer.encode(answer)) + 3


def test_an_interrupted_answer_stays_in_the_history_and_the_next_turn_still_matches_a_fresh_prefill(
        model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    endless = copy.copy(tokenizer)
    endless.eos_token_ids = frozenset()  # four tokens come, however likely a stop token is
    session = greedy_session((model, endless))
    reply = session.reply("Tell me a long story.")
    partial = [next(reply) for _ in range(4)]
    reply.close()  # what Ctrl-C does
    assert session.last_turn.interrupted
    assert session.messages[-1] == {"role": "assistant", "content": "".join(step.text for step in partial)}
    ask_and_check_against_fresh(model_and_tokenizer, session, "Shorter, please.")


def test_a_saved_chat_loads_with_its_cache_and_continues_identically(model_and_tokenizer, tmp_path):
    session = greedy_session(model_and_tokenizer, system="Be brief.")
    say(session, "Hello!")
    say(session, "How are you?")
    path = session.save(tmp_path / "chat.json")
    assert json.loads(path.read_text())["messages"] == session.messages
    restored = greedy_session(model_and_tokenizer)
    restored.load(path)
    assert restored.system == "Be brief." and restored.context_used == session.context_used
    assert say(restored, "Bye.") == say(session, "Bye.")
    assert restored.last_turn.reused_tokens > 0


def test_loading_a_file_that_is_not_a_saved_chat_names_it(model_and_tokenizer, tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text("[1, 2]")
    with pytest.raises(QwenMLXError, match="notes.json: not a saved qwenmlx chat"):
        greedy_session(model_and_tokenizer).load(bad)


def test_outgrowing_the_window_drops_the_oldest_turns_but_keeps_the_system_prompt(model_and_tokenizer):
    session = greedy_session(model_and_tokenizer, system="Remember me.")
    for i in range(3):
        say(session, f"turn {i} " + "words " * 20)
    session.window = len(session.render()) + ANSWER_TOKENS + 5  # room for about one more exchange
    ask_and_check_against_fresh(model_and_tokenizer, session, "turn 3 " + "words " * 20)
    assert session.last_turn.dropped_turns >= 1
    assert session.messages[0]["content"].startswith("turn ") and "Remember me." in session.tokenizer.decode(
        session.render())


def test_a_rotating_cache_bounds_the_chat_and_reports_what_it_evicted(model_and_tokenizer):
    session = greedy_session(model_and_tokenizer, max_kv_size=64)
    evicted = 0
    for i in range(4):
        say(session, f"turn {i} " + "words " * 10)
        assert session.context_used <= 64
        evicted += session.last_turn.evicted_tokens
    assert evicted > 0 and session.cache[0].evicted == evicted
