"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) translated to the one internal
`Request` and its events back, for Claude Code and every tool built on the `anthropic` SDK.

The model's reasoning goes out as `thinking` blocks, its text as `text` blocks, its tool calls as
`tool_use` blocks (input as an object). A stream is the event sequence the SDK accumulates:
message_start, then per block content_block_start / content_block_delta... / content_block_stop,
then message_delta (stop_reason, usage) and message_stop; `ping` while nothing else comes. The whole
answer is that same sequence accumulated, so the two cannot disagree. `usage.input_tokens` counts the
prompt tokens that were not read from the prompt cache, as Anthropic counts them;
`cache_read_input_tokens` the ones that were.
"""

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .reply import Text, ToolCall
from .request import (
    Call,
    Failed,
    Finished,
    Request,
    RequestError,
    Started,
    arguments_object,
    assistant_message,
    content_text,
    function_tool,
    parse,
    tool_call,
    tool_result,
)
from .sse import sse, typed_stream

log = logging.getLogger("qwenmlx.server")

PATH = "/v1/messages"
PING = sse({"type": "ping"}, "ping")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error"}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "stop": "end_turn"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


# Requests, as Anthropic documents them (cache_control, metadata, citations...: accepted and ignored).


class Block(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict | None = None
    tool_use_id: str | None = None
    content: "str | list[Block] | None" = None


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str | None = None
    name: str
    description: str | None = None
    input_schema: dict | None = None  # none: one of Anthropic's server tools (web search, ...), which run there


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["auto", "any", "tool", "none"]


class Thinking(BaseModel):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=0)


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False


def block_text(blocks: str | list[Block] | None, param: str) -> str:
    return content_text(blocks, param, separator="\n")


def template_messages(body: CountTokensRequest) -> list[dict]:
    """The conversation in the chat template's shape: tool results become tool messages, tool uses tool calls."""
    out = []
    if body.system:
        out.append({"role": "system", "content": block_text(body.system, "system")})
    for i, message in enumerate(body.messages):
        blocks = [Block(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        texts, reasoning, calls = [], None, []
        for j, block in enumerate(blocks):
            param = f"messages.{i}.content.{j}"
            if block.type == "text":
                texts.append(block.text or "")
            elif block.type == "tool_result" and message.role == "user":
                out.append(tool_result(block_text(block.content, param)))
            elif block.type == "tool_use" and message.role == "assistant":
                calls.append(tool_call(block.name or "", block.input or {}))
            elif block.type == "thinking" and message.role == "assistant":
                reasoning = block.thinking
            elif block.type != "redacted_thinking":
                raise RequestError(f"{block.type} blocks are not supported in {message.role} messages", param)
        if message.role == "assistant":
            out.append(assistant_message("\n".join(texts), reasoning, calls))
        elif texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def conversation(body: CountTokensRequest) -> dict:
    """The Request fields a message and a count of its tokens share: messages, tools, thinking."""
    tools = None
    if body.tools and not (body.tool_choice and body.tool_choice.type == "none"):
        for server_tool in (t for t in body.tools if t.input_schema is None):
            log.warning("tool %r (%s) runs on Anthropic's servers, not here: left out of the prompt",
                        server_tool.name, server_tool.type)
        tools = [function_tool(t.name, t.description, t.input_schema) for t in body.tools if t.input_schema is not None]
    thinking = None if body.thinking is None else body.thinking.type != "disabled"
    budget = body.thinking.budget_tokens if body.thinking and thinking else None
    return {"messages": template_messages(body), "tools": tools, "thinking": thinking, "thinking_budget": budget}


def message_request(body: dict, model: str) -> tuple[Request, Call]:
    message = parse(MessagesRequest, body)
    id = f"msg_{uuid.uuid4().hex}"
    sampling = {"temperature": message.temperature, "top_p": message.top_p, "top_k": message.top_k}
    request = Request(id=id, max_tokens=message.max_tokens, sampling=sampling, stop=message.stop_sequences or [],
                      **conversation(message))
    return request, Call(id, model, message.stream)


def count_tokens_request(body: dict) -> Request:
    return Request(**conversation(parse(CountTokensRequest, body)))


# Responses: internal events -> Anthropic's stream events -> (accumulated) the whole message.


def usage_body(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens - cached_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached_tokens, "cache_creation_input_tokens": 0}


class StreamEvents:
    """The engine's events in, Anthropic's stream events out: one content block per run of a kind, or per tool call."""

    def __init__(self, call: Call):
        self.call, self.index, self.open_kind = call, -1, None

    def feed(self, event) -> list[dict]:
        if isinstance(event, Started):
            return [{"type": "message_start", "message": {
                "id": self.call.id, "type": "message", "role": "assistant", "model": self.call.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": usage_body(event.prompt_tokens, event.cached_tokens, 0)}}]
        if isinstance(event, Text):
            kind = "thinking" if event.kind == "reasoning" else "text"
            out = []
            if kind != self.open_kind:
                out += self.close()
                out.append(self.start({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                                      else {"type": "text", "text": ""}))
                self.open_kind = kind
            delta = {"type": "thinking_delta", "thinking": event.text} if kind == "thinking" else \
                {"type": "text_delta", "text": event.text}
            return out + [{"type": "content_block_delta", "index": self.index, "delta": delta}]
        if isinstance(event, ToolCall):
            out = self.close()
            out.append(self.start({"type": "tool_use", "id": f"toolu_{event.id.removeprefix('call_')}",
                                   "name": event.name, "input": {}}))
            arguments = json.dumps(arguments_object(event.arguments), ensure_ascii=False)
            return out + [{"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "input_json_delta", "partial_json": arguments}},
                          {"type": "content_block_stop", "index": self.index}]
        if isinstance(event, Finished):
            reason = "stop_sequence" if event.stop_sequence is not None else STOP_REASONS.get(event.reason)
            usage = event.usage
            return self.close() + [
                {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": event.stop_sequence},
                 "usage": usage_body(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)},
                {"type": "message_stop"}]
        if isinstance(event, Failed):
            return [error_body(event.status, event.message)]
        return []

    def start(self, block: dict) -> dict:
        self.index += 1
        return {"type": "content_block_start", "index": self.index, "content_block": block}

    def close(self) -> list[dict]:
        """The open text or thinking block's end, if one is open."""
        was_open, self.open_kind = self.open_kind, None
        return [{"type": "content_block_stop", "index": self.index}] if was_open else []


def message_response(call: Call, events: list) -> dict:
    """The whole message: the stream's events accumulated."""
    message, arguments, stream = None, {}, StreamEvents(call)
    for event in (e for internal in events for e in stream.feed(internal)):
        if event["type"] == "message_start":
            message = event["message"]
        elif event["type"] == "content_block_start":
            message["content"].append(dict(event["content_block"]))
        elif event["type"] == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "input_json_delta":
                arguments[event["index"]] = arguments.get(event["index"], "") + delta["partial_json"]
            else:
                field = "thinking" if delta["type"] == "thinking_delta" else "text"
                block[field] += delta[field]
        elif event["type"] == "content_block_stop" and event["index"] in arguments:
            message["content"][event["index"]]["input"] = json.loads(arguments[event["index"]])
        elif event["type"] == "message_delta":
            message.update(event["delta"])
            message["usage"] = event["usage"]
    return message


def message_stream(call: Call, events: AsyncIterator) -> AsyncIterator[str]:
    """Server-sent events, each named by its type, as Anthropic sends them."""
    return typed_stream(StreamEvents(call).feed, events)
