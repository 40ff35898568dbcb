"""`qwenmlx chat` driven as a person would, through a pseudo-terminal; the model's words are noise, the mechanics are checked."""

import json
import sys

import pexpect
import pytest

from qwenmlx.chat import ChatSession
from qwenmlx.checkpoint import load

PROMPT = ">>> "


def start_chat(model_dir, *options) -> pexpect.spawn:
    # codec_errors: the terminal echoes ^C wherever it lands, even inside a character's UTF-8 bytes.
    child = pexpect.spawn(sys.executable, ["-m", "qwenmlx", "chat", "--model", str(model_dir), "--temp", "0", *options],
                          encoding="utf-8", codec_errors="replace", timeout=30, dimensions=(40, 200),
                          # pexpect is no terminal emulator: it cannot answer prompt_toolkit's cursor position requests
                          env={"TERM": "xterm", "PYTHONPATH": ".", "PROMPT_TOOLKIT_NO_CPR": "1"})
    child.expect("qwenmlx chat")
    child.expect_exact(PROMPT)
    return child


def command(child: pexpect.spawn, line: str, reply: str) -> None:
    child.sendline(line)
    child.expect(reply)
    child.expect_exact(PROMPT)


@pytest.fixture(scope="module")
def saved_chat(tmp_path_factory):
    return tmp_path_factory.mktemp("chat") / "chat.json"


@pytest.fixture(scope="module")
def endless_dir(moe_dir, tmp_path_factory):
    """The tiny checkpoint with no stop token: every answer runs to --max-tokens, whatever the weights prefer."""
    dst = tmp_path_factory.mktemp("endless")
    for path in moe_dir.iterdir():
        (dst / path.name).symlink_to(path)
    for name, stop in (("generation_config.json", "eos_token_id"), ("tokenizer_config.json", "eos_token")):
        config = json.loads((moe_dir / name).read_text())
        del config[stop]
        (dst / name).unlink()
        (dst / name).write_text(json.dumps(config))
    return dst


def test_messages_no_think_save_and_exit(endless_dir, saved_chat):
    child = start_chat(endless_dir, "--max-tokens", "24", "--system", "Be brief.")
    child.sendline("Hello, who are you?")
    child.expect(r"24 tokens · [\d.]+ tok/s · prefill \d+ at \d+ tok/s · context \d+/4096")
    child.expect_exact(PROMPT)
    command(child, "/no_think", "thinking off")
    child.sendline("first line \\")
    child.expect_exact("... ")
    child.sendline("second line")
    child.expect(r"24 tokens .* context \d+/4096")
    child.expect_exact(PROMPT)
    command(child, f"/save {saved_chat}", f"saved 4 messages to {saved_chat}")
    command(child, "/help", "/save FILE")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert saved_chat.is_file() and saved_chat.with_name("chat.json.kv.safetensors").is_file()


def test_load_then_ctrl_c_stops_the_answer_but_not_the_chat(endless_dir, saved_chat):
    child = start_chat(endless_dir, "--max-tokens", "100000")
    command(child, f"/load {saved_chat}", r"loaded 4 messages \(\d+ tokens of cache\)")
    child.sendline("Tell me a very long story.")
    child.expect(r"generating · [1-9]\d* tokens")  # the answer is streaming (100,000 tokens would take minutes)
    child.sendintr()
    child.expect(r"interrupted · [1-9]\d* tokens")
    child.expect_exact(PROMPT)
    command(child, "/stats", r"messages\s+6")
    command(child, "/reset", "conversation reset")
    child.send("half a line")
    child.sendintr()  # at the prompt: the line is dropped
    child.expect_exact("(Ctrl-D or /exit to leave)")
    child.expect_exact(PROMPT)
    command(child, "/stats", r"messages\s+0")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_missing_default_model_is_offered_once_and_declining_is_one_clear_line(tmp_path):
    child = pexpect.spawn(sys.executable, ["-m", "qwenmlx", "chat"], encoding="utf-8", timeout=60,
                          env={"QWENMLX_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "."})
    child.expect_exact("download Qwen/Qwen3-30B-A3B (61 GB) and convert it to experts-4 (18 GB)? [y/N]")
    child.sendline("n")
    child.expect("no model: run `qwenmlx pull`")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def chat_saved_by_moe(moe_dir, tmp_path_factory):
    """A two-turn chat with its KV cache, saved by the tiny MoE model."""
    session = ChatSession(*load(moe_dir), temperature=0.0, max_tokens=8)
    for text in ("Hello!", "How are you?"):
        list(session.reply(text))
    return session.save(tmp_path_factory.mktemp("saved") / "chat.json")


@pytest.mark.parametrize("other", ["dense", "moe-other-weights"])
def test_loading_a_chat_saved_under_another_model_drops_its_cache_and_the_chat_goes_on(
        other, checkpoint_dir, moe_dir_other_weights, chat_saved_by_moe):
    child = start_chat(checkpoint_dir("dense") if other == "dense" else moe_dir_other_weights, "--max-tokens", "8")
    command(child, f"/load {chat_saved_by_moe.parent}", "error:.*: is a directory, not a saved chat")
    child.sendline(f"/load {chat_saved_by_moe}")
    child.expect(r"loaded 4 messages \(0 tokens of cache\)")
    child.expect("note: the saved KV cache was made by another model: dropped")
    child.expect_exact(PROMPT)
    child.sendline("Still there?")
    child.expect(r"8 tokens .* prefill \d+ at \d+ tok/s · context \d+/4096")  # the whole history prefilled
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_pasted_text_arrives_whole_a_10000_character_line_and_a_paste_block(moe_dir, tmp_path):
    long_line = ("pasted text " * 1000)[:10_000]  # the terminal's canonical mode would cut it at 4,095
    block = ['a block with """ quotes', "a line ending in \\", "", "the end"]
    saved = tmp_path / "chat.json"
    child = start_chat(moe_dir, "--max-tokens", "4", "--no-think", "--plain")
    child.sendline(long_line)
    child.expect(r"4 tokens .* context \d+/4096")
    child.expect_exact(PROMPT)
    command(child, f"/save {saved}", "saved 2 messages")
    assert json.loads(saved.read_text())["messages"][0]["content"] == long_line
    child.sendline("/paste")
    child.expect("Ctrl-D sends")
    child.expect_exact("... ")
    child.send("\r".join(block))
    child.sendcontrol("d")
    child.expect(r"4 tokens .* context \d+/4096")
    child.expect_exact(PROMPT)
    command(child, f"/save {saved}", "saved 4 messages")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert json.loads(saved.read_text())["messages"][2]["content"] == "\n".join(block)


def test_a_message_longer_than_the_window_is_refused_with_a_note(moe_dir):
    child = start_chat(moe_dir, "--max-kv-size", "256", "--max-tokens", "8")
    child.sendline("word " * 300)
    # 256 less the 8 tokens kept for the answer (--max-tokens 8)
    child.expect(r"error:.* message not sent: it takes \d+ tokens, and the context window holds 248")
    child.expect_exact(PROMPT)
    command(child, "/stats", r"messages\s+0")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
