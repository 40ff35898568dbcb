"""The HTTP side: routes, auth, CORS, errors, streaming with keep-alives, disconnects. Starlette on uvicorn.

A request is checked and rendered off the event loop, queued on the engine, and its events are sent
back as they come (a stream) or all at once. When the client goes away the job is cancelled, and the
generation thread stops it within one decode step.
"""

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import anthropic, openai, responses
from .engine import Engine, Job, Unavailable
from .request import Failed, Request, RequestError

log = logging.getLogger("qwenmlx.server")

KEEPALIVE_SECONDS = 5.0
RETRY_AFTER_SECONDS = 1
TEST_HOOK_HEADER = "x-qwenmlx-test-script"  # honoured only by an engine made with allow_scripted


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """An error in the shape of the API the path belongs to (Anthropic's under /v1/messages, else OpenAI's)."""
    if path.startswith(anthropic.PATH):
        body = anthropic.error_body(status, message)
    else:
        body = openai.error_body(status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


class KeyAuth:
    """Every path but /health needs the key, as `Authorization: Bearer KEY` (OpenAI) or `x-api-key: KEY` (Anthropic)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope["headers"])
            bearer = headers.get(b"authorization", b"").removeprefix(b"Bearer ")
            if not any(secrets.compare_digest(given, self.key) for given in (bearer, headers.get(b"x-api-key", b""))):
                response = error_response(scope["path"], 401, "missing or wrong API key (send Authorization: Bearer "
                                          "KEY or x-api-key: KEY)", code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def with_keepalives(frames: AsyncIterator[str], seconds: float,
                          keepalive: str = ": keep-alive\n\n") -> AsyncIterator[str]:
    """The frames, with a keep-alive frame whenever none came for `seconds` (a long prefill, a queue)."""
    frames = aiter(frames)
    next_frame = asyncio.ensure_future(anext(frames))
    try:
        while True:
            done, _ = await asyncio.wait({next_frame}, timeout=seconds)
            if not done:
                yield keepalive
                continue
            try:
                frame = next_frame.result()
            except StopAsyncIteration:
                return
            yield frame
            next_frame = asyncio.ensure_future(anext(frames))
    finally:
        next_frame.cancel()


class EventStream(StreamingResponse):
    """An SSE response that cancels its job however it ends (finished, client gone, server stopping)."""

    def __init__(self, job: Job, frames: AsyncIterator[str], keepalive_seconds: float, keepalive: str):
        super().__init__(with_keepalives(frames, keepalive_seconds, keepalive), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def disconnected(http: HTTPRequest) -> None:
    """Returns when the client has gone (the body has been read, so nothing else can arrive)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def json_body(http: HTTPRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


@dataclass
class Face:
    """How one endpoint answers: its whole response, its stream, and the keep-alive frame its clients expect."""

    respond: Callable[[Any, list], dict]
    stream: Callable[[Any, AsyncIterator], AsyncIterator[str]]
    keepalive: str = ": keep-alive\n\n"


CHAT = Face(openai.chat_response, openai.chat_stream)
COMPLETION = Face(openai.completion_response, openai.completion_stream)
MESSAGES = Face(anthropic.message_response, anthropic.message_stream, anthropic.PING)
RESPONSES = Face(responses.response_body, responses.response_stream)


def create_app(engine: Engine, *, api_key: str | None = None, cors_origin: str | None = None,
               keepalive_seconds: float = KEEPALIVE_SECONDS) -> Starlette:
    """The app over an engine (started or not: /health says 503 until it is ready)."""

    async def run(http: HTTPRequest, request: Request, call: Any, face: Face) -> Response:
        script = http.headers.get(TEST_HOOK_HEADER)
        if script and engine.allow_scripted:
            request.scripted = json.loads(script)  # the tests' own header
        loop = asyncio.get_running_loop()
        try:
            job = await asyncio.to_thread(engine.prepare, request, loop)
            engine.submit(job)
        except RequestError as e:
            raise ApiError(400, e.message, e.param, e.code) from None
        except Unavailable as e:
            raise ApiError(503, e.message, code=e.code, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        if call.stream:
            return EventStream(job, face.stream(call, job.events()), keepalive_seconds, face.keepalive)
        try:
            collected = asyncio.ensure_future(collect(job))
            gone = asyncio.ensure_future(disconnected(http))
            await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not collected.done():  # nobody to answer
                collected.cancel()
                return Response(status_code=499)
            events = collected.result()
        finally:
            job.cancel()
        if isinstance(events[-1], Failed):
            raise ApiError(events[-1].status, events[-1].message)
        return JSONResponse(face.respond(call, events))

    async def collect(job: Job) -> list:
        return [event async for event in job.events()]

    async def health(http: HTTPRequest) -> Response:
        body = {"status": "ok" if engine.state == "ready" else engine.state, "model": engine.name,
                "waiting": engine.waiting, "running": len(engine.running), **engine.split}
        return JSONResponse(body, status_code=200 if engine.state == "ready" else 503)

    async def models(http: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": 0, "owned_by": "qwenmlx"}]})

    async def chat_completions(http: HTTPRequest) -> Response:
        request, call = openai.chat_request(await json_body(http), engine.name)
        return await run(http, request, call, CHAT)

    async def completions(http: HTTPRequest) -> Response:
        request, call = openai.completion_request(await json_body(http), engine.name)
        return await run(http, request, call, COMPLETION)

    async def messages(http: HTTPRequest) -> Response:
        request, call = anthropic.message_request(await json_body(http), engine.name)
        return await run(http, request, call, MESSAGES)

    async def count_tokens(http: HTTPRequest) -> Response:
        request = anthropic.count_tokens_request(await json_body(http))
        try:
            prompt, _ = await asyncio.to_thread(engine.render, request)
        except Unavailable as e:
            raise ApiError(503, e.message, code=e.code, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        return JSONResponse({"input_tokens": len(prompt)})

    async def responses_(http: HTTPRequest) -> Response:
        request, call = responses.response_request(await json_body(http), engine.name)
        return await run(http, request, call, RESPONSES)

    async def api_error(http: HTTPRequest, e: ApiError) -> Response:
        return error_response(http.url.path, e.status, e.message, e.param, e.code, e.headers)

    async def request_error(http: HTTPRequest, e: RequestError) -> Response:
        return error_response(http.url.path, 400, e.message, e.param, e.code)

    async def http_error(http: HTTPRequest, e: HTTPException) -> Response:
        return error_response(http.url.path, e.status_code, f"{http.method} {http.url.path}: {e.detail}")

    async def server_error(http: HTTPRequest, e: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(http.url.path, 500, f"internal error: {type(e).__name__}: {e}")

    middleware = []
    if cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["*"],
                                     allow_headers=["*"]))
    if api_key:
        middleware.append(Middleware(KeyAuth, api_key=api_key))
    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route(anthropic.PATH, messages, methods=["POST"]),
        Route(f"{anthropic.PATH}/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/responses", responses_, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, RequestError: request_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
