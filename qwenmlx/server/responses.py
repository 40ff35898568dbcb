"""OpenAI's Responses API (POST /v1/responses), as `client.responses.create` sends it, translated to the one
internal `Request` and its events back: for Codex CLI and the newer OpenAI SDK tools.

Stateless: every request carries its whole conversation (`store` is ignored, nothing is kept), so
`previous_response_id` is refused with a 400 that says so. The model's reasoning goes out as a
`reasoning` item (its text as `reasoning_text` content), its text as a `message` item, its tool calls
as `function_call` items. A stream is the typed event sequence (response.created, ...,
response.completed); the whole answer is the response that sequence ends with.
"""

import time
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
    assistant_message,
    content_text,
    function_tool,
    parse,
    tool_call,
    tool_result,
)
from .sse import typed_stream

THINKING_OFF = ("none", "minimal")  # reasoning efforts that turn Qwen's thinking off; the others turn it on


class Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Item(BaseModel):
    """An input item: a message, a function call the model made, or its output (reasoning items are skipped)."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[Part] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[Part] | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict | None = None


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="allow")
    effort: str | None = None


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    reasoning: Reasoning | None = None
    stream: bool = False
    previous_response_id: str | None = None


def part_text(content: str | list[Part] | None, param: str) -> str:
    return content_text(content, param, ("input_text", "output_text", "text"))


def template_messages(body: ResponseRequest) -> list[dict]:
    """The conversation in the chat template's shape; a model's function calls join its message before them."""
    out = [{"role": "system", "content": body.instructions}] if body.instructions else []
    items = [Item(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        param = f"input.{i}"
        if item.type == "message":
            role = "system" if item.role == "developer" else item.role or "user"
            text = part_text(item.content, f"{param}.content")
            out.append(assistant_message(text) if role == "assistant" else {"role": role, "content": text})
        elif item.type == "function_call":
            call = tool_call(item.name or "", item.arguments or "{}")
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append(assistant_message("", tool_calls=[call]))
        elif item.type == "function_call_output":
            out.append(tool_result(part_text(item.output, f"{param}.output")))
        elif item.type != "reasoning":
            raise RequestError(f"input items of type {item.type!r} are not supported", f"{param}.type")
    return out


def response_request(body: dict, model: str) -> tuple[Request, Call]:
    response = parse(ResponseRequest, body)
    if response.previous_response_id is not None:
        raise RequestError("previous_response_id is not supported: this server keeps no responses (stateless); "
                           "send the whole conversation in `input`", "previous_response_id")
    tools = None
    if response.tools and response.tool_choice != "none":
        for i, tool in enumerate(response.tools):
            if tool.type != "function" or not tool.name:
                raise RequestError(f"only function tools are supported, not {tool.type!r}", f"tools.{i}.type")
        tools = [function_tool(t.name, t.description, t.parameters) for t in response.tools]
    effort = response.reasoning.effort if response.reasoning else None
    id = f"resp_{uuid.uuid4().hex}"
    request = Request(id=id, messages=template_messages(response), tools=tools,
                      thinking=None if effort is None else effort not in THINKING_OFF,
                      max_tokens=response.max_output_tokens,
                      sampling={"temperature": response.temperature, "top_p": response.top_p})
    return request, Call(id, model, response.stream)


# Responses: internal events -> typed stream events, the last of which carries the whole response.


class StreamEvents:
    """The engine's events in, the Responses stream's events out; `response` is the response so far."""

    def __init__(self, call: Call):
        self.response = {"id": call.id, "object": "response", "created_at": int(time.time()), "model": call.model,
                         "status": "in_progress", "output": [], "error": None, "incomplete_details": None,
                         "usage": None}
        self.sequence = 0
        self.open: dict | None = None  # the reasoning or message item text is going into

    def feed(self, event) -> list[dict]:
        if isinstance(event, Started):
            return [self.event("response.created", response=dict(self.response)),
                    self.event("response.in_progress", response=dict(self.response))]
        if isinstance(event, Text):
            kind = "reasoning" if event.kind == "reasoning" else "message"
            out = []
            if self.open is None or self.open["type"] != kind:
                out += self.close()
                out += self.open_item(kind)
            part = self.open["content"][0]
            part["text"] += event.text
            name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            return out + [self.event(name, **self.where(), content_index=0, delta=event.text, **extra)]
        if isinstance(event, ToolCall):
            out = self.close()
            item = {"type": "function_call", "id": f"fc_{event.id.removeprefix('call_')}", "call_id": event.id,
                    "name": event.name, "arguments": "", "status": "in_progress"}
            out.append(self.add(item))
            item["arguments"] = event.arguments
            where = {"item_id": item["id"], "output_index": len(self.response["output"]) - 1}
            out.append(self.event("response.function_call_arguments.delta", **where, delta=event.arguments))
            out.append(self.event("response.function_call_arguments.done", **where, name=event.name,
                                  arguments=event.arguments))
            item["status"] = "completed"
            return out + [self.event("response.output_item.done", output_index=where["output_index"], item=item)]
        if isinstance(event, Finished):
            out = self.close()
            usage = event.usage
            self.response["usage"] = {
                "input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens}
            if event.reason == "length":
                self.response["status"] = "incomplete"
                self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            else:
                self.response["status"] = "completed"
            name = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
            return out + [self.event(name, response=self.response)]
        if isinstance(event, Failed):
            self.response["status"] = "failed"
            self.response["error"] = {"code": "server_error", "message": event.message}
            return [self.event("response.failed", response=self.response)]
        return []

    def event(self, type: str, **fields) -> dict:
        self.sequence += 1
        return {"type": type, "sequence_number": self.sequence - 1, **fields}

    def where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.response["output"]) - 1}

    def add(self, item: dict) -> dict:
        self.response["output"].append(item)
        return self.event("response.output_item.added", output_index=len(self.response["output"]) - 1,
                          item=dict(item, content=[]) if "content" in item else dict(item))

    def open_item(self, kind: str) -> list[dict]:
        if kind == "reasoning":
            item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "content": [],
                    "status": "in_progress"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        added = self.add(item)
        self.open = item
        item["content"].append(part)
        return [added, self.event("response.content_part.added", **self.where(), content_index=0, part=dict(part))]

    def close(self) -> list[dict]:
        """The open reasoning or message item's end, if one is open."""
        if self.open is None:
            return []
        item, part, where = self.open, self.open["content"][0], self.where()
        done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        item["status"] = "completed"
        self.open = None
        return [self.event(done, **where, content_index=0, text=part["text"]),
                self.event("response.content_part.done", **where, content_index=0, part=part),
                self.event("response.output_item.done", output_index=where["output_index"], item=item)]


def response_body(call: Call, events: list) -> dict:
    """The whole response: the one the stream of these events ends with."""
    stream = StreamEvents(call)
    for event in events:
        stream.feed(event)
    return stream.response


def response_stream(call: Call, events: AsyncIterator) -> AsyncIterator[str]:
    return typed_stream(StreamEvents(call).feed, events)
