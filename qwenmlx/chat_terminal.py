"""The terminal chat (the CLI's `chat` command): read a message, stream the answer with rich, handle /commands.

All conversation logic lives in chat.ChatSession; this module only reads, prints and dispatches. From a
terminal, lines are read with prompt_toolkit: the terminal's own line editing (canonical mode) cuts a
line at 4,095 characters, prompt_toolkit has no limit and adds editing and the session's history.
Piped input is read as it comes.
"""

import sys

from prompt_toolkit import PromptSession
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.table import Table
from rich.text import Text

from .chat import ChatSession
from .errors import QwenMLXError

HELP = """\
Type a message and press Enter. End a line with \\ to continue it, wrap several lines in \"\"\",
or type /paste for a block of any text that ends with Ctrl-D.
  /think, /no_think   switch thinking on or off for the next answers (Qwen3's soft switches)
  /hide_thinking      hide or show the <think> part while it streams
  /system TEXT        set the system prompt (empty: none)
  /reset              forget the conversation
  /save FILE          save the history (JSON) and the KV cache (FILE.kv.safetensors)
  /load FILE          load a saved chat (this session's settings stay; its KV cache only if it fits them)
  /stats              figures of the last answer and the context
  /help, /exit        this text; leave (Ctrl-D also leaves; Ctrl-C stops an answer or drops the line typed)"""


PROMPT, CONTINUATION = [("ansigreen bold", ">>> ")], [("ansibrightblack", "... ")]  # prompt_toolkit's styled text


class LineEditor:
    """Lines from the terminal through prompt_toolkit, with the session's history (Up/Down) and editing."""

    def __init__(self):
        history = InMemoryHistory()
        self.lines = PromptSession(history=history)
        block_keys = KeyBindings()
        block_keys.add("c-d")(lambda event: event.current_buffer.validate_and_handle())
        self.blocks = PromptSession(history=history, multiline=True, key_bindings=block_keys,
                                    prompt_continuation=CONTINUATION)

    def line(self, continued: bool = False) -> str:
        return self.lines.prompt(CONTINUATION if continued else PROMPT)

    def block(self) -> str:
        """Text of any length and lines: Enter starts a new line, Ctrl-D (or Esc Enter) sends it."""
        return self.blocks.prompt(CONTINUATION)


class PipedLines:
    """Lines from a pipe or a file (no terminal in between, so no length limit either)."""

    def __init__(self, console: Console):
        self.console = console

    def line(self, continued: bool = False) -> str:
        return self.console.input(Text("... ", style="dim") if continued else "[bold green]>>> [/bold green]")

    def block(self) -> str:
        """Every line up to the end of the input."""
        lines = []
        try:
            while True:
                lines.append(self.line(continued=True))
        except EOFError:
            return "\n".join(lines)


def is_command(line: str) -> bool:
    return line.startswith("/") and line.strip() != "/paste"


class ChatTerminal:
    def __init__(self, session: ChatSession, console: Console, *, plain: bool = False, hide_thinking: bool = False):
        self.session, self.console, self.plain, self.hide_thinking = session, console, plain, hide_thinking
        self.reader = LineEditor() if sys.stdin.isatty() and sys.stdout.isatty() else PipedLines(console)

    def run(self) -> None:
        self.console.print(f"[bold]qwenmlx chat[/bold] · thinking {'on' if self.session.thinking else 'off'} · "
                           "/help for commands, Ctrl-D to leave", highlight=False)
        while True:
            try:
                first = self.reader.line()
                text = first if is_command(first) else self.read_message(first)
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-D or /exit to leave)[/dim]", highlight=False)
                continue
            if is_command(first):
                if self.command(first.strip()) == "exit":
                    return
            elif text.strip():
                self.answer(text)

    def read_message(self, first: str) -> str:
        """One message: a line, lines continued with a trailing backslash, a block between triple quotes, or /paste."""
        if first.strip() == "/paste":
            self.console.print("[dim](paste or type; Ctrl-D sends, Ctrl-C cancels)[/dim]", highlight=False)
            return self.reader.block()
        if first.strip() == '"""':
            lines = []
            while (line := self.reader.line(continued=True)).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self.reader.line(continued=True))
        return "\n".join(lines)

    def answer(self, text: str) -> None:
        thinking, answer, progress = Text(style="dim"), Text(), Text(style="dim")
        live = None if self.plain else Live(Group(thinking, answer, progress), console=self.console,
                                            refresh_per_second=8, vertical_overflow="visible")
        steps, refused = self.session.reply(text), None
        try:
            if live:
                live.start()
            for n, step in enumerate(steps, 1):
                progress.plain = f"generating · {n} tokens"  # shown until the answer ends, hidden thinking included
                if step.thinking and self.hide_thinking:
                    continue
                if self.plain:
                    self.console.out(step.text, end="", style="dim" if step.thinking else None, highlight=False)
                else:
                    (thinking if step.thinking else answer).append(step.text)
        except KeyboardInterrupt:
            steps.close()
        except QwenMLXError as e:  # the message does not fit the window: nothing was sent
            refused = e
        finally:
            if live:
                live.update(Group(thinking, Markdown(answer.plain)))  # the answer as Markdown, without the progress
                live.stop()
        if refused:
            self.console.print(f"[red]error:[/red] {refused}", highlight=False)
            return
        if self.plain:
            self.console.out("")
        self.status_line()

    def status_line(self) -> None:
        turn, s = self.session.last_turn, self.session.last_turn.stats
        parts = [f"{s.generated_tokens} tokens", f"{s.decode_tps:.1f} tok/s",
                 f"prefill {turn.prefilled_tokens} at {s.prefill_tps:.0f} tok/s",
                 f"context {self.session.context_used}/{self.session.window}"]
        if turn.interrupted:
            parts.insert(0, "interrupted")
        if turn.dropped_turns:
            parts.append(f"dropped the {turn.dropped_turns} oldest exchange(s) to fit the window (system prompt kept)")
        if turn.evicted_tokens:
            parts.append(f"window full: the KV cache evicted {turn.evicted_tokens} oldest tokens "
                         f"(kept the first {self.session.cache[0].keep})")
        self.console.print(f"[dim]{' · '.join(parts)}[/dim]", highlight=False)

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        session = self.session
        if name in ("/exit", "/quit"):
            return "exit"
        if name in ("/think", "/no_think"):
            self.console.print(session.switch_thinking(name == "/think"), highlight=False)
        elif name == "/hide_thinking":
            self.hide_thinking = not self.hide_thinking
            self.console.print(f"thinking {'hidden' if self.hide_thinking else 'shown'} while streaming")
        elif name == "/system":
            session.set_system(arg)
            self.console.print(f"system prompt {'set' if arg else 'cleared'}")
        elif name == "/reset":
            session.reset()
            self.console.print("conversation reset")
        elif name in ("/save", "/load") and not arg:
            self.console.print(f"[red]usage:[/red] {name} FILE")
        elif name in ("/save", "/load"):
            try:
                if name == "/save":
                    self.console.print(f"saved {len(session.messages)} messages to {session.save(arg)}",
                                       highlight=False)
                else:
                    notes = session.load(arg)
                    self.console.print(f"loaded {len(session.messages)} messages "
                                       f"({session.context_used} tokens of cache) from {arg}", highlight=False)
                    for note in notes:
                        self.console.print(f"[dim]note: {note}[/dim]", highlight=False)
            except QwenMLXError as e:
                self.console.print(f"[red]error:[/red] {e}", highlight=False)
        elif name == "/stats":
            self.stats()
        elif name == "/help":
            self.console.print(HELP, highlight=False, markup=False)
        else:
            self.console.print(f"unknown command {name}; /help lists them", highlight=False)
        return None

    def stats(self) -> None:
        session, table = self.session, Table(show_header=False, box=None)
        table.add_row("messages", str(len(session.messages)))
        table.add_row("context", f"{session.context_used} / {session.window} tokens")
        table.add_row("KV cache", f"{session.cache[0].describe()['type']}, "
                      f"{sum(c.nbytes for c in session.cache) / 1e6:.1f} MB, bits {session.cache[0].bits or 'float'}")
        if session.last_turn:
            turn, s = session.last_turn, session.last_turn.stats
            table.add_row("last prompt", f"{turn.reused_tokens} reused + {turn.prefilled_tokens} prefilled tokens")
            table.add_row("prefill", f"{s.prefill_tps:.1f} tok/s")
            table.add_row("decode", f"{s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s")
            table.add_row("peak memory", f"{s.peak_memory_gb:.2f} GB")
        if session.model.split is not None:
            split = session.model.split
            table.add_row("ranks", f"{split.size}, split by {split.mode}: {split.bytes_per_token / 1e3:.1f} KB sent "
                          f"per token, {split.collectives_per_token} exchanges of {split.seconds_per_collective * 1e6:.0f}"
                          " µs each (timed at load)")
            if session.last_turn:
                s = session.last_turn.stats
                table.add_row("communication", f"about {split.communication_seconds(s.generated_tokens):.2f} s of the "
                              f"last answer's {s.decode_seconds:.2f} s of decode")
        self.console.print(table)
