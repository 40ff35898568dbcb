"""What the generated tokens become in an answer, the same for every API: reasoning kept apart from
content, `<tool_call>{json}</tool_call>` turned into tool calls, stop strings cut out.

Text is handed on as soon as it cannot be the start of a marker or of a stop string, so a stream
still moves token by token.
"""

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..generate import Thought

log = logging.getLogger("qwenmlx.server")

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class Text:
    kind: str  # "reasoning" or "content"
    text: str
    logprobs: list = field(default_factory=list)  # of the tokens this text completes, when asked for


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object, as text


def partial_marker_length(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that begins one of the markers: it waits for the next token."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


class StopStrings:
    """Finds the first stop string in streamed text, across token boundaries; text before it goes on, the rest not."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: str | None = None  # the stop string found

    def feed(self, text: str) -> str:
        self.pending += text
        found = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if found:
            at, self.hit = min(found)
            released, self.pending = self.pending[:at], ""
            return released
        keep = partial_marker_length(self.pending, self.stops)
        released = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(released):]
        return released

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released


class Section:
    """A run of reasoning or content: blank lines at its edges are dropped, whitespace inside it kept."""

    def __init__(self, kind: str, trim: bool):
        self.kind, self.trim = kind, trim
        self.started, self.held = False, ""

    def add(self, text: str) -> list[Text]:
        if not self.trim:
            return [Text(self.kind, text)] if text else []
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        if not self.started:
            body = body.lstrip()
        if not body:
            return []
        self.started = True
        return [Text(self.kind, body)]

    def close(self) -> None:
        self.started, self.held = False, ""


class ToolCalls:
    """Content text in; content text and tool calls out. A call that is not valid JSON stays content."""

    def __init__(self):
        self.buffer, self.inside, self.count = "", False, 0

    def feed(self, text: str) -> list[str | ToolCall]:
        self.buffer += text
        out = []
        while True:
            if not self.inside:
                start = self.buffer.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = partial_marker_length(self.buffer, [TOOL_CALL_OPEN])
                    out.append(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                out.append(self.buffer[:start])
                self.buffer, self.inside = self.buffer[start + len(TOOL_CALL_OPEN):], True
            else:
                end = self.buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    break
                out.append(self._call(self.buffer[:end]))
                self.buffer, self.inside = self.buffer[end + len(TOOL_CALL_CLOSE):], False
        return [x for x in out if x != ""]

    def flush(self) -> list[str]:
        """What is left at the end; an unclosed call is content."""
        rest = (TOOL_CALL_OPEN if self.inside else "") + self.buffer
        if self.inside:
            log.warning("the model left a tool call unclosed; sent as content: %r", rest[:200])
        self.buffer, self.inside = "", False
        return [rest] if rest else []

    def _call(self, body: str) -> str | ToolCall:
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError("name is not a string")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            log.warning("malformed tool call from the model (%s); sent as content: %r", e, body[:200])
            return TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        self.count += 1
        return ToolCall(self.count - 1, f"call_{uuid.uuid4().hex[:24]}", name, arguments)


class Reply:
    """One answer in the making: feed each generated token with its text, send the pieces that come back.

    chat: the tokens answer a chat prompt, so thought markers (also one the template opened in the prompt)
    split reasoning from content, and each section's blank edges are dropped. Otherwise (a raw completion)
    every character is content. Stop strings apply to the content.
    """

    def __init__(self, tokenizer, prompt: list[int], *, chat: bool = True, tools: bool = False,
                 stop: Iterable[str] = ()):
        self.think_ids = (tokenizer.think_start_id, tokenizer.think_end_id)
        self.thought = Thought(*self.think_ids, prompt) if chat else None
        self.stops = StopStrings(stop)
        self.tool_calls = ToolCalls() if tools else None
        self.reasoning, self.content = Section("reasoning", trim=chat), Section("content", trim=chat)
        self.in_thought = False  # whether the last token fed belonged to the thought

    @property
    def stopped(self) -> bool:
        """A stop string was found: generation should end."""
        return self.stops.hit is not None

    @property
    def stop_sequence(self) -> str | None:
        return self.stops.hit

    @property
    def n_tool_calls(self) -> int:
        return self.tool_calls.count if self.tool_calls else 0

    def feed(self, token: int, text: str) -> list[Text | ToolCall]:
        self.in_thought = self.thought is not None and self.thought.update(token)
        if self.in_thought:
            for marker, marker_id in zip(("<think>", "</think>"), self.think_ids):
                if token == marker_id:
                    text = text.replace(marker, "")
            pieces = self.reasoning.add(text)
            if token == self.think_ids[1]:
                self.reasoning.close()
            return pieces
        return self._content(self.stops.feed(text))

    def finish(self) -> list[Text | ToolCall]:
        """The text held back for a possible marker or stop string, once generation has ended."""
        pieces = self._content(self.stops.flush())
        if self.tool_calls:
            for text in self.tool_calls.flush():
                pieces += self.content.add(text)
        return pieces

    def _content(self, text: str) -> list[Text | ToolCall]:
        if self.tool_calls is None:
            return self.content.add(text)
        pieces = []
        for item in self.tool_calls.feed(text):
            if isinstance(item, ToolCall):
                self.content.close()
                pieces.append(item)
            else:
                pieces += self.content.add(item)
        return pieces
