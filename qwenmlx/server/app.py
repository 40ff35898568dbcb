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

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import openai
from .engine import Engine, Failed, Job, Request, RequestError, Unavailable

log = logging.getLogger("qwenmlx.server")

KEEPALIVE_SECONDS = 5.0
RETRY_AFTER_SECONDS = 1
TEST_HOOK_HEADER = "x-qwenmlx-test-script"  # honoured only by an engine made with allow_scripted


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(openai.error_body(status, message, param, code), status_code=status, headers=headers)


class BearerAuth:
    """Every path but /health needs `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def with_keepalives(frames: AsyncIterator[str], seconds: float) -> AsyncIterator[str]:
    """The frames, with an SSE comment whenever none came for `seconds` (a long prefill, a queue)."""
    frames = aiter(frames)
    next_frame = asyncio.ensure_future(anext(frames))
    try:
        while True:
            done, _ = await asyncio.wait({next_frame}, timeout=seconds)
            if not done:
                yield ": keep-alive\n\n"
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

    def __init__(self, job: Job, frames: AsyncIterator[str], keepalive_seconds: float):
        super().__init__(with_keepalives(frames, keepalive_seconds), media_type="text/event-stream",
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


def create_app(engine: Engine, *, api_key: str | None = None, cors_origin: str | None = None,
               keepalive_seconds: float = KEEPALIVE_SECONDS) -> Starlette:
    """The OpenAI-compatible app over an engine (started or not: /health says 503 until it is ready)."""

    async def run(http: HTTPRequest, request: Request, call: openai.Call,
                  stream: Callable[[openai.Call, AsyncIterator], AsyncIterator[str]],
                  respond: Callable[[openai.Call, list], dict]) -> Response:
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
            return EventStream(job, stream(call, job.events()), keepalive_seconds)
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
        return JSONResponse(respond(call, events))

    async def collect(job: Job) -> list:
        return [event async for event in job.events()]

    async def health(http: HTTPRequest) -> Response:
        body = {"status": "ok" if engine.state == "ready" else engine.state, "model": engine.name,
                "waiting": engine.waiting, "running": engine.running is not None}
        return JSONResponse(body, status_code=200 if engine.state == "ready" else 503)

    async def models(http: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": 0, "owned_by": "qwenmlx"}]})

    async def chat_completions(http: HTTPRequest) -> Response:
        request, call = openai.chat_request(await json_body(http), engine.name)
        return await run(http, request, call, openai.chat_stream, openai.chat_response)

    async def completions(http: HTTPRequest) -> Response:
        request, call = openai.completion_request(await json_body(http), engine.name)
        return await run(http, request, call, openai.completion_stream, openai.completion_response)

    async def api_error(http: HTTPRequest, e: ApiError) -> Response:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    async def request_error(http: HTTPRequest, e: RequestError) -> Response:
        return error_response(400, e.message, e.param, e.code)

    async def http_error(http: HTTPRequest, e: HTTPException) -> Response:
        return error_response(e.status_code, f"{http.method} {http.url.path}: {e.detail}")

    async def server_error(http: HTTPRequest, e: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    middleware = []
    if cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["*"],
                                     allow_headers=["*"]))
    if api_key:
        middleware.append(Middleware(BearerAuth, api_key=api_key))
    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, RequestError: request_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
