"""OpenAI's Chat Completions and Completions shapes, translated to the engine's `Request` and its events back.

Thinking goes out as `reasoning_content` and, with the same text, as `reasoning` (clients read one
or the other), never inside `content`. Tool calls go out as `tool_calls` with finish_reason
"tool_calls". Streams are server-sent events: `data: {json}` per chunk, then `data: [DONE]`.
"""

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import request
from .reply import Text, ToolCall
from .request import Failed, Finished, Request, RequestError, Usage, content_text, parse
from .sse import sse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


# Requests, as OpenAI documents them (fields other servers add: top_k, min_p, repetition_penalty, ...).


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: the template does not use them
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(BaseModel):
    include_usage: bool = False


class Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    thinking_budget: int | None = Field(None, ge=0)


class ChatCompletionRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)


@dataclass
class Call(request.Call):
    include_usage: bool
    logprobs: bool


def common_request(id: str, body: Common, **fields) -> Request:
    if body.n != 1:
        raise RequestError("only n=1 is supported", "n")
    sampling = {name: getattr(body, name) for name in
                ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty", "seed")}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return Request(id=id, sampling=sampling, stop=stop, thinking_budget=body.thinking_budget, **fields)


def template_message(message: Message, index: int) -> dict:
    """A message in the shape Qwen3's chat template reads."""
    role = "system" if message.role == "developer" else message.role
    rendered = {"role": role, "content": content_text(message.content, f"messages.{index}.content")}
    if message.role == "assistant":
        if message.tool_calls:
            rendered["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
        reasoning = message.reasoning_content if message.reasoning_content is not None else message.reasoning
        if reasoning is not None:
            rendered["reasoning_content"] = reasoning
    return rendered


def chat_request(body: dict, model: str) -> tuple[Request, Call]:
    chat = parse(ChatCompletionRequest, body)
    kwargs = chat.chat_template_kwargs or {}
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise RequestError("chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
    tools = None
    if chat.tools and chat.tool_choice != "none":
        tools = [tool.model_dump(exclude_none=True) for tool in chat.tools]
    id = f"chatcmpl-{uuid.uuid4().hex}"
    request = common_request(
        id, chat, messages=[template_message(m, i) for i, m in enumerate(chat.messages)], tools=tools,
        thinking=thinking, max_tokens=chat.max_completion_tokens or chat.max_tokens,
        top_logprobs=(chat.top_logprobs or 0) if chat.logprobs else None,
    )
    call = Call(id, model, chat.stream,
                bool(chat.stream_options and chat.stream_options.include_usage), chat.logprobs)
    return request, call


def completion_request(body: dict, model: str) -> tuple[Request, Call]:
    completion = parse(CompletionRequest, body)
    prompt = completion.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise RequestError("only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    id = f"cmpl-{uuid.uuid4().hex}"
    request = common_request(id, completion, prompt=prompt, max_tokens=completion.max_tokens,
                             top_logprobs=completion.logprobs)
    call = Call(id, model, completion.stream,
                bool(completion.stream_options and completion.stream_options.include_usage),
                completion.logprobs is not None)
    return request, call


# Responses.


def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def chat_logprobs(entries: list[dict]) -> list[dict]:
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]} for e in entries]


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def tool_call_body(call: ToolCall, streaming: bool) -> dict:
    body = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return {"index": call.index, **body} if streaming else body


def chat_response(call: Call, events: list) -> dict:
    """The whole answer, from every event of a finished job."""
    reasoning = "".join(e.text for e in events if isinstance(e, Text) and e.kind == "reasoning")
    content = "".join(e.text for e in events if isinstance(e, Text) and e.kind == "content")
    tool_calls = [tool_call_body(e, streaming=False) for e in events if isinstance(e, ToolCall)]
    finished = events[-1]
    message = {"role": "assistant", "content": content or (None if tool_calls else "")}
    if reasoning:
        message["reasoning_content"] = message["reasoning"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    logprobs = None
    if call.logprobs:
        logprobs = {"content": chat_logprobs([lp for e in events if isinstance(e, Text) for lp in e.logprobs])}
    return {"id": call.id, "object": "chat.completion", "created": int(time.time()), "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finished.reason}],
            "usage": usage_body(finished.usage)}


def completion_response(call: Call, events: list) -> dict:
    texts = [e for e in events if isinstance(e, Text)]
    logprobs = completion_logprobs([lp for e in texts for lp in e.logprobs], 0) if call.logprobs else None
    finished = events[-1]
    return {"id": call.id, "object": "text_completion", "created": int(time.time()), "model": call.model,
            "choices": [{"index": 0, "text": "".join(e.text for e in texts), "logprobs": logprobs,
                         "finish_reason": finished.reason}],
            "usage": usage_body(finished.usage)}


async def chat_stream(call: Call, events: AsyncIterator) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if call.logprobs and logprobs:
            choice["logprobs"] = {"content": chat_logprobs(logprobs)}
        return sse({"id": call.id, "object": "chat.completion.chunk", "created": created, "model": call.model,
                    "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    async for event in events:
        if isinstance(event, Text) and event.kind == "reasoning":
            yield chunk({"reasoning_content": event.text, "reasoning": event.text})
        elif isinstance(event, Text):
            yield chunk({"content": event.text}, logprobs=event.logprobs)
        elif isinstance(event, ToolCall):
            yield chunk({"tool_calls": [tool_call_body(event, streaming=True)]})
        elif isinstance(event, Failed):
            yield sse(error_body(event.status, event.message))
        elif isinstance(event, Finished):
            yield chunk({}, event.reason)
            if call.include_usage:
                yield sse({"id": call.id, "object": "chat.completion.chunk", "created": created, "model": call.model,
                           "choices": [], "usage": usage_body(event.usage)})
    yield sse("[DONE]")


async def completion_stream(call: Call, events: AsyncIterator) -> AsyncIterator[str]:
    created, offset = int(time.time()), 0

    def chunk(text: str, finish_reason: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if call.logprobs and logprobs:
            choice["logprobs"] = completion_logprobs(logprobs, offset)
        return sse({"id": call.id, "object": "text_completion", "created": created, "model": call.model,
                    "choices": [choice]})

    async for event in events:
        if isinstance(event, Text):
            yield chunk(event.text, logprobs=event.logprobs)
            offset += len(event.text)
        elif isinstance(event, Failed):
            yield sse(error_body(event.status, event.message))
        elif isinstance(event, Finished):
            yield chunk("", event.reason)
            if call.include_usage:
                yield sse({"id": call.id, "object": "text_completion", "created": created, "model": call.model,
                           "choices": [], "usage": usage_body(event.usage)})
    yield sse("[DONE]")
