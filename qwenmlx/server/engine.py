"""The one generation thread: it owns MLX, takes requests in arrival order from a bounded queue, reuses
KV caches across requests, and sends each request's events back to the asyncio side.

Every API module turns its request shape into a `Request` and reads the events back out: `Text`
and `ToolCall` pieces (see reply.py), then `Finished` or `Failed`. Nothing here knows HTTP or any
API's format. A request is checked and rendered on the caller's side (`prepare`), so a bad one is
refused before it queues; a client that goes away cancels its job, which stops within one decode
step (or one prefill chunk).
"""

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import mlx.core as mx

from ..cache import KVCache, RotatingKVCache, copy_caches, make_cache
from ..errors import QwenMLXError
from ..generate import default_sampling, stream_generate
from .prompt_cache import PromptCache
from .reply import Reply, Text

log = logging.getLogger("qwenmlx.server")


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
class Finished:
    reason: str  # "stop", "length", "tool_calls", or "cancelled" (nobody is listening then)
    usage: Usage


@dataclass
class Failed:
    status: int
    message: str


class RequestError(Exception):
    """The request cannot be served as it is (HTTP 400); param names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class Unavailable(Exception):
    """Not now: the model is loading, or the queue is full (HTTP 503)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message, self.code = message, code


class Cancelled(Exception):
    pass


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    key: str  # stands for the weights and config in prompt-cache namespaces


def thinking_switch(messages: list[dict]) -> bool:
    """Qwen3's soft switch: the last /think or /no_think in the user's and system's messages; thinking by default."""
    for message in reversed(messages):
        if message["role"] in ("user", "system"):
            text = message["content"]
            on, off = text.rfind("/think"), text.rfind("/no_think")
            if on >= 0 or off >= 0:
                return on > off
    return True


def scripted_sampler(tokens: list[int], end: int, failure: str | None):
    """Test hook: the next token of a fixed reply, whatever the logits say (the model still runs every step)."""
    queue_ = iter(tokens)

    def sample(logits: mx.array, counts: mx.array) -> mx.array:
        if failure:
            raise MemoryError(failure)
        return mx.array([next(queue_, end)])

    return sample


class Job:
    """A prepared request on its way through the engine; the asyncio side reads its events, and may cancel it."""

    def __init__(self, request: Request, prompt: list[int], chat: bool, sampling, max_tokens: int,
                 loop: asyncio.AbstractEventLoop):
        self.request, self.prompt, self.chat = request, prompt, chat
        self.sampling, self.max_tokens = sampling, max_tokens
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event) -> None:
        """From the generation thread; dropped when the event loop has already closed (the server stopping)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            self.cancel()

    async def events(self) -> AsyncIterator:
        """Text and ToolCall pieces, then Finished or Failed."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return


class Engine:
    """Loads the model on its own thread, then generates for one job at a time in arrival order.

    Loading happens on the generation thread too: MLX streams belong to the thread that made them.
    """

    def __init__(self, load: Callable[[], LoadedModel], *, name: str, max_kv_size: int | None = None,
                 kv_bits: int | None = None, prompt_cache_bytes: int = 2 << 30, max_tokens: int | None = None,
                 max_queue: int = 16, prefill_step: int | None = None, allow_scripted: bool = False):
        if max_queue < 0:
            raise QwenMLXError(f"--max-queue {max_queue}: must be 0 or more")
        if prompt_cache_bytes < 0:
            raise QwenMLXError("--prompt-cache-gb: must be 0 or more")
        if max_tokens is not None and max_tokens < 1:
            raise QwenMLXError(f"--max-tokens {max_tokens}: must be at least 1")
        if max_kv_size is not None:  # the caches' own checks of their settings, before anything loads
            RotatingKVCache(max_kv_size, bits=kv_bits)
        else:
            KVCache(kv_bits)
        self.name = name
        self._load = load
        self.max_kv_size, self.kv_bits, self.prefill_step = max_kv_size, kv_bits, prefill_step
        self.max_tokens, self.max_queue, self.allow_scripted = max_tokens, max_queue, allow_scripted
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.state = "loading"  # then "ready", or "failed" with load_error
        self.load_error: Exception | None = None
        self.model = self.tokenizer = None
        self.namespace = ""
        self.waiting = 0
        self.running: Job | None = None
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="qwenmlx-generation", daemon=True)

    def start(self, on_ready: Callable[[], None] = lambda: None,
              on_load_error: Callable[[Exception], None] = lambda e: None) -> None:
        self._on_ready, self._on_load_error = on_ready, on_load_error
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    # The caller's side.

    def prepare(self, request: Request, loop: asyncio.AbstractEventLoop) -> Job:
        """Check and render a request; RequestError says what is wrong with it."""
        if self.state != "ready":
            raise Unavailable("the model is still loading" if self.state == "loading" else "the model failed to load",
                              "model_not_ready")
        tokenizer, param = self.tokenizer, "messages" if request.messages is not None else "prompt"
        try:
            if request.messages is not None:
                thinking = thinking_switch(request.messages) if request.thinking is None else request.thinking
                prompt = tokenizer.apply_chat_template(request.messages, enable_thinking=thinking,
                                                       tools=request.tools or None, tokenize=True)
                thinking = tokenizer.thinks(thinking)  # a 2507 model's template decides alone
            else:
                thinking, prompt = False, tokenizer.encode(request.prompt)
            sampling = default_sampling(thinking, tokenizer.generation_config, **request.sampling)
        except QwenMLXError as e:
            raise RequestError(str(e), param) from None
        if not prompt:
            raise RequestError("the prompt is empty", param)
        room = self.context - len(prompt)
        if room < 1:
            raise RequestError(f"the prompt is {len(prompt)} tokens, which does not fit the model's context of "
                               f"{self.context} tokens", param, "context_length_exceeded")
        max_tokens = min(n for n in (request.max_tokens, self.max_tokens, room) if n is not None)
        return Job(request, prompt, request.messages is not None, sampling, max_tokens, loop)

    def submit(self, job: Job) -> None:
        """Queue a job; Unavailable when --max-queue jobs are already waiting."""
        with self._lock:
            if self.waiting >= self.max_queue:
                raise Unavailable(f"the server is busy ({self.waiting} requests waiting); retry shortly",
                                  "queue_full")
            self.waiting += 1
        self._queue.put(job)

    # The generation thread.

    def _run(self) -> None:
        try:
            loaded = self._load()
        except Exception as e:
            self.state, self.load_error = "failed", e
            self._on_load_error(e)
            return
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.namespace = f"{loaded.key}|max_kv_size={self.max_kv_size}|kv_bits={self.kv_bits}"
        self.state = "ready"
        self._on_ready()
        while (job := self._queue.get()) is not None:
            with self._lock:
                self.waiting -= 1
                self.running = job
            try:
                self._serve(job)
            finally:
                self.running = None

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            return log.info("%s: cancelled while waiting", job.request.id)
        try:
            self._generate(job)
        except Cancelled:
            log.info("%s: cancelled during prefill", job.request.id)
        except (MemoryError, RuntimeError) as e:  # MLX reports a failed allocation as RuntimeError
            log.error("%s failed: %s", job.request.id, e)
            self.prompt_cache.clear()
            mx.clear_cache()
            out_of_memory = isinstance(e, MemoryError) or any(w in str(e).lower() for w in ("memory", "alloc"))
            message = f"out of memory: {e}" if out_of_memory else f"internal error: {e}"
            job.send(Failed(500, message))
        except Exception as e:
            log.error("%s failed:\n%s", job.request.id, traceback.format_exc())
            job.send(Failed(500, f"internal error: {type(e).__name__}: {e}"))

    def _generate(self, job: Job) -> None:
        request, prompt = job.request, job.prompt
        reuse = self.prompt_cache.fetch(self.namespace, prompt)
        caches = reuse.caches or make_cache(self.model, self.max_kv_size, self.kv_bits)
        # A rotating cache may evict during the reply: then the prompt's checkpoint must be copied before it.
        early_checkpoint = self.max_kv_size is not None and len(prompt) + job.max_tokens > self.max_kv_size
        checkpoint = None
        reply = Reply(self.tokenizer, prompt, chat=job.chat, tools=bool(request.tools), stop=request.stop)
        logprobs = [] if request.top_logprobs is not None else None
        sampler = None
        if request.scripted:
            scripted = self.tokenizer.encode(request.scripted.get("reply", ""))
            sampler = scripted_sampler(scripted, min(self.tokenizer.eos_token_ids), request.scripted.get("fail"))

        def on_prefill_progress(done: int, total: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled

        steps = stream_generate(self.model, self.tokenizer, prompt[reuse.reused:], cache=caches, sampling=job.sampling,
                                max_tokens=job.max_tokens, thinking_budget=request.thinking_budget,
                                prefill_step=self.prefill_step, on_prefill_progress=on_prefill_progress,
                                sampler=sampler, logprobs=logprobs)
        generated, pending_logprobs, stats, reason = [], [], None, "cancelled"
        start = time.perf_counter()
        try:
            for step in steps:
                if early_checkpoint and checkpoint is None:  # the caches hold the prompt and this token
                    checkpoint = copy_caches(caches)
                    for c in checkpoint:
                        c.trim(1)
                generated.append(step.token)
                stats = step.stats
                pieces = reply.feed(step.token, step.text)
                if logprobs is not None and logprobs[-1] is not None and not reply.in_thought:
                    pending_logprobs.append(self._token_logprobs(step.token, logprobs[-1], request.top_logprobs))
                for piece in pieces:
                    if isinstance(piece, Text) and piece.kind == "content":
                        piece.logprobs, pending_logprobs = pending_logprobs, []
                    job.send(piece)
                if reply.stopped or job.cancelled.is_set():
                    break
            if not job.cancelled.is_set():
                for piece in reply.finish():
                    job.send(piece)
                reason = "stop" if reply.stopped else ("tool_calls" if reply.n_tool_calls else stats.finish_reason)
        finally:
            steps.close()  # the caches now hold the prompt and all but the last generated token
        held = (prompt + generated)[: caches[0].offset + caches[0].evicted]
        self.prompt_cache.store(self.namespace, held, caches, prompt, checkpoint)
        seconds = time.perf_counter() - start
        log.info("%s: %s, %d prompt tokens (%d cached), %d generated, %.2f s to the first token, "
                 "%.1f tok/s, %.2f s", request.id, reason, len(prompt), reuse.reused, len(generated),
                 stats.prefill_seconds if stats else 0, stats.decode_tps if stats else 0, seconds)
        job.send(Finished(reason, Usage(len(prompt), len(generated), reuse.reused)))

    def _token_logprobs(self, token: int, logprobs: mx.array, top: int) -> dict:
        """The chosen token's log-probability and the `top` likeliest alternatives, as text."""
        decode = self.tokenizer.decode
        alternatives = []
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[ids]
            order = mx.argsort(-values)
            alternatives = [(decode([i]), v) for i, v in zip(ids[order].tolist(), values[order].tolist())]
        return {"token": decode([token]), "logprob": logprobs[token].item(), "top": alternatives}
