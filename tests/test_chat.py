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


# --- save and load: nothing left behind, nothing silently wrong ---

@pytest.fixture(scope="module")
def saved_chat(model_and_tokenizer, tmp_path_factory):
    """A two-turn chat saved by the tiny MoE model with a float, unbounded cache and thinking on."""
    session = greedy_session(model_and_tokenizer, system="Be brief.")
    say(session, "Hello!")
    say(session, "How are you?")
    return session.save(tmp_path_factory.mktemp("saved") / "chat.json")


@pytest.fixture(scope="module", params=["other KV shapes", "same shapes, other weights"])
def other_model(request, checkpoint_dir, moe_dir_other_weights):
    """A model with as many layers as the tiny MoE that made saved_chat, but another one."""
    return load(checkpoint_dir("dense") if request.param == "other KV shapes" else moe_dir_other_weights)


def files_in(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_saving_onto_a_directory_fails_before_writing_anything(model_and_tokenizer, tmp_path):
    session = greedy_session(model_and_tokenizer)
    say(session, "Hello!")
    (tmp_path / "chats").mkdir()
    with pytest.raises(QwenMLXError, match="chats: is a directory"):
        session.save(tmp_path / "chats")
    assert files_in(tmp_path) == ["chats"]


@pytest.mark.parametrize("existing", ["chat.json", "chat.json.kv.safetensors"])
def test_saving_where_a_file_not_written_by_a_save_exists_keeps_the_file(model_and_tokenizer, tmp_path, existing):
    (tmp_path / existing).write_text("my notes")
    with pytest.raises(QwenMLXError, match=f"{existing}: exists and is not a "):
        greedy_session(model_and_tokenizer).save(tmp_path / "chat.json")
    assert (tmp_path / existing).read_text() == "my notes" and files_in(tmp_path) == [existing]


def test_saving_again_onto_a_saved_chat_replaces_it(model_and_tokenizer, tmp_path):
    session = greedy_session(model_and_tokenizer)
    say(session, "Hello!")
    session.save(tmp_path / "chat.json")
    say(session, "Again.")
    session.save(tmp_path / "chat.json")
    assert len(json.loads((tmp_path / "chat.json").read_text())["messages"]) == 4
    assert files_in(tmp_path) == ["chat.json", "chat.json.kv.safetensors"]


def test_a_chat_saved_under_another_model_loads_its_history_and_drops_the_cache(other_model, saved_chat):
    session = greedy_session(other_model)
    notes = session.load(saved_chat)
    assert session.context_used == 0 and len(session.messages) == 4
    assert any("made by another model" in note for note in notes)
    ask_and_check_against_fresh(other_model, session, "Still there?")  # the history prefilled by this model


def test_loading_keeps_the_sessions_cache_settings_and_thinking_and_says_so(model_and_tokenizer, saved_chat):
    for settings, kept in [(dict(kv_bits=8), "8-bit, unbounded"), (dict(max_kv_size=256), "float, bounded to 256 tokens")]:
        session = greedy_session(model_and_tokenizer, thinking=False, **settings)
        notes = session.load(saved_chat)
        assert session.context_used == 0 and session.cache[0].settings_in_words() == kept and not session.thinking
        assert f"is float, unbounded, this session's {kept}" in " ".join(notes)
        assert "thinking stays off" in " ".join(notes)
        never_saved = greedy_session(model_and_tokenizer, thinking=False, **settings)
        never_saved.system, never_saved.messages = session.system, list(session.messages)
        assert say(session, "Still there?") == say(never_saved, "Still there?")


BROKEN_CHATS = {
    "messages-not-a-list": {"system": None, "thinking": True, "messages": "Hello!"},
    "message-not-a-dict": {"system": None, "thinking": True, "messages": ["Hello!"]},
    "message-without-content": {"system": None, "thinking": True, "messages": [{"role": "user"}]},
    "message-of-another-role": {"system": None, "thinking": True, "messages": [{"role": "tool", "content": "x"}]},
    "system-not-text": {"system": 3, "thinking": True, "messages": []},
}


@pytest.mark.parametrize("name", ["a-directory", "corrupt-cache", *BROKEN_CHATS])
def test_a_load_that_fails_names_the_file_and_leaves_the_session_as_it_was(model_and_tokenizer, saved_chat, tmp_path,
                                                                            name):
    path = tmp_path / "chat.json"
    if name == "a-directory":
        path.mkdir()
    elif name == "corrupt-cache":
        path.write_bytes(saved_chat.read_bytes())
        cache = saved_chat.with_name("chat.json.kv.safetensors").read_bytes()
        path.with_name("chat.json.kv.safetensors").write_bytes(cache[: len(cache) // 2])
    else:
        path.write_text(json.dumps(BROKEN_CHATS[name]))
    session = greedy_session(model_and_tokenizer, system="Mine.")
    say(session, "Hello!")
    before = (list(session.messages), session.context_used)
    with pytest.raises(QwenMLXError, match="chat.json"):
        session.load(path)
    assert (session.messages, session.context_used, session.system) == (*before, "Mine.")


@pytest.mark.parametrize("max_kv_size", [None, 256])
def test_a_message_longer_than_the_window_is_refused_and_the_history_kept(model_and_tokenizer, max_kv_size):
    session = greedy_session(model_and_tokenizer, max_kv_size=max_kv_size)
    say(session, "Hello!")
    before = (list(session.messages), session.context_used)
    too_long = "word " * session.window
    with pytest.raises(QwenMLXError, match=r"message not sent: it takes \d+ tokens"):
        say(session, too_long)
    assert (session.messages, session.context_used) == before
    say(session, "word " * (session.window // 2))  # what fits still goes through


@pytest.mark.parametrize("model_card, note", [(None, {True: "thinking on", False: "thinking off"}),
                                              ("Instruct-2507", "thinking is fixed: it never thinks"),
                                              ("Thinking-2507", "thinking is fixed: it always thinks")])
def test_think_and_no_think_say_when_the_models_template_fixes_its_thinking(model_and_tokenizer, moe_dir, tmp_path,
                                                                             model_card, note):
    from qwenmlx.tokenizer import Tokenizer
    from tests.checkpoints import checkpoint_variant
    from tests.qwen_tokenizer_files import FIXTURES

    model, tokenizer = model_and_tokenizer
    if model_card is not None:
        template = (FIXTURES / f"chat_template-Qwen3-30B-A3B-{model_card}.jinja").read_bytes()
        tokenizer = Tokenizer.from_dir(checkpoint_variant(moe_dir, tmp_path / "model", {"chat_template.jinja": template}))
    session = ChatSession(model, tokenizer)
    for on in (True, False):
        line = session.switch_thinking(on)
        expected = note[on] if isinstance(note, dict) else note
        assert expected in line and "\n" not in line
        assert session.thinking == on
