"""`qwenmlx chat` driven as a person would, through a pseudo-terminal; the model's words are noise, the mechanics are checked."""

import sys
import time

import pexpect
import pytest

PROMPT = ">>> "


def start_chat(model_dir, *options) -> pexpect.spawn:
    # codec_errors: the terminal echoes ^C wherever it lands, even inside a character's UTF-8 bytes.
    child = pexpect.spawn(sys.executable, ["-m", "qwenmlx", "chat", "--model", str(model_dir), "--temp", "0", *options],
                          encoding="utf-8", codec_errors="replace", timeout=30, dimensions=(40, 200),
                          env={"TERM": "xterm", "PYTHONPATH": "."})
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


def test_messages_no_think_save_and_exit(moe_dir, saved_chat):
    child = start_chat(moe_dir, "--max-tokens", "24", "--system", "Be brief.")
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


def test_load_then_ctrl_c_stops_the_answer_but_not_the_chat(moe_dir, saved_chat):
    child = start_chat(moe_dir, "--max-tokens", "100000")
    command(child, f"/load {saved_chat}", r"loaded 4 messages \(\d+ tokens of cache\)")
    child.sendline("Tell me a very long story.")
    child.expect_exact("Tell me a very long story.")
    time.sleep(2)  # the answer is streaming (100,000 tokens would take minutes)
    child.sendintr()
    child.expect(r"interrupted · [1-9]\d* tokens")
    child.expect_exact(PROMPT)
    command(child, "/stats", r"messages\s+6")
    command(child, "/reset", "conversation reset")
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
