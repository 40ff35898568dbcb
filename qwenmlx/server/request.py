"""The one internal request under every API, and the events that come back from it.

Each API module (openai.py, anthropic.py, responses.py) translates its request shape into a `Request`
(messages in the chat template's shape, tools, sampling, thinking) with the helpers here, and the
events (`Started`, reply.py's `Text` and `ToolCall` pieces, then `Finished` or `Failed`) back into its own shapes.
Nothing here knows HTTP or any one API.
"""

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError


@dataclass
class Request:
    """One generation, whichever API it came through."""

    id: str = ""  # the API's id for it, in the server log
    messages: list[dict] | None = None  # a chat, in the template's shape (role, content, tool_calls, ...)
    prompt: str | None = None  # or raw text, used as it is
    tools: list[dict] | None = None
    thinking: bool | None = None  # None: the conversation's last /think or /no_think, else on
    max_tokens: int | None = None  # None: until the model stops, within the context
    sampling: dict = field(default_factory=dict)  # temperature, top_p, ...; None: the mode's default
    stop: list[str] = field(default_factory=list)
    thinking_budget: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; n: the chosen token's and the n likeliest
    scripted: dict | None = None  # test hook ({"reply": text} or {"fail": message}); set only where allowed


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Started:
    """The engine has taken the request: its prompt, of which `cached_tokens` come from the prompt cache."""

    prompt_tokens: int
    cached_tokens: int


@dataclass
class Finished:
    reason: str  # "stop", "length", "tool_calls", or "cancelled" (nobody is listening then)
    usage: Usage
    stop_sequence: str | None = None  # the stop string that ended it, if one did


@dataclass
class Failed:
    status: int
    message: str


class RequestError(Exception):
    """The request cannot be served as it is (HTTP 400); param names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class Call:
    """What an API's response needs to know about its request besides the engine's events."""

    id: str
    model: str
    stream: bool


def parse(model: type[BaseModel], body: dict) -> Any:
    """The body as the API's pydantic model; RequestError names the first field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise RequestError(f"{param}: {error['msg']}" if param else error["msg"], param) from None


# Messages and tools in the shape Qwen3's chat template reads.


def content_text(content: str | list | None, param: str, text_types: tuple[str, ...] = ("text",),
                 separator: str = "") -> str:
    """The text of a message's content: a string, or parts (with .type and .text) that must all be text."""
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.type not in text_types for part in content):
        raise RequestError(f"only text content is supported ({', '.join(text_types)} parts)", param)
    return separator.join(part.text or "" for part in content)


def function_tool(name: str, description: str | None, parameters: dict | None) -> dict:
    function = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}


def tool_call(name: str, arguments: str | dict) -> dict:
    """A call the assistant made, as the template renders it back (arguments as JSON text or an object)."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_message(content: str, reasoning: str | None = None, tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def tool_result(content: str) -> dict:
    return {"role": "tool", "content": content}


def arguments_object(arguments: str) -> dict:
    """A tool call's arguments (JSON text from reply.py) as the object Anthropic's API sends; anything else under "value"."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = arguments
    return value if isinstance(value, dict) else {"value": value}
