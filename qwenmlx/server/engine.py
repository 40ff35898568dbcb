"""The one generation thread: it owns MLX, takes requests in arrival order from a bounded queue, decodes
the concurrent ones as one batch, reuses KV caches across requests, and sends each request's events
back to the asyncio side.

Every API module turns its request shape into a `Request` and reads the events back out (see
request.py). Nothing here knows HTTP or any API's format. A request is checked and rendered on the
caller's side (`prepare`), so a bad one is refused before it queues; a client that goes away cancels
its job, which stops within one decode step (or one prefill chunk).
"""

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..batch import decode_step, decodes_in_a_batch
from ..cache import KVCache, RotatingKVCache, copy_caches, make_cache
from ..distributed import IDLE_TICK_SECONDS
from ..errors import QwenMLXError
from ..generate import THINKING_BUDGET_TEXT, Thought, default_sampling, make_sampler, prefill_step_for, shared_sampler
from .prompt_cache import DiskCache, PromptCache
from .reply import Reply, Text
from .request import Failed, Finished, Request, RequestError, Started, Usage

log = logging.getLogger("qwenmlx.server")


class Unavailable(Exception):
    """Not now: the model is loading, or the queue is full (HTTP 503)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message, self.code = message, code


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
    """Test hook: the next token of a fixed reply, whatever the logits say. The logits are still evaluated, so
    the model runs every step as it would for a real sampler (and the caches never hold a step's work undone)."""
    queue_ = iter(tokens)

    def sample(logits: mx.array, counts: mx.array) -> mx.array:
        if failure:
            raise MemoryError(failure)
        mx.eval(logits)
        return mx.array([next(queue_, end)])

    return sample


def argmax(logits: mx.array, counts: mx.array | None = None) -> mx.array:
    return mx.argmax(logits, axis=-1)


def greedy_tokens(batch: list["Sequence"], logits: mx.array, model=None) -> dict:
    """The next token of each plain greedy sequence (argmax, nothing else) of the batch, from one argmax call."""
    greedy = [i for i, s in enumerate(batch) if s.argmax_only]
    if not greedy:
        return {}
    rows = logits if len(greedy) == len(batch) else logits[mx.array(greedy)]
    tokens = shared_sampler(model, argmax)(rows, None)
    return {batch[i]: (tokens[j : j + 1], None) for j, i in enumerate(greedy)}


class Job:
    """A prepared request on its way through the engine; the asyncio side reads its events, and may cancel it."""

    def __init__(self, request: Request, prompt: list[int], chat: bool, sampling, max_tokens: int,
                 loop: asyncio.AbstractEventLoop | None):
        self.request, self.prompt, self.chat = request, prompt, chat
        self.sampling, self.max_tokens = sampling, max_tokens
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event) -> None:
        """From the generation thread; dropped when the event loop has already closed (the server stopping), and
        on a follower rank, whose copy of the job has no loop: rank 0 answers."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            self.cancel()

    async def events(self) -> AsyncIterator:
        """Started, Text and ToolCall pieces, then Finished or Failed (alone when it fails before it starts)."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return


@dataclass
class Changes:
    """What the generation thread takes in before a step: jobs to start, running jobs cancelled, or stop."""

    jobs: list[Job] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)  # indices into the batch (Engine.running)
    stop: bool = False
    idle: bool = False  # under mlx.launch: nothing runs and no job came within a tick (the others may rest)


class Engine:
    """Loads the model on its own thread, then decodes up to max_batch jobs together, taken in arrival order.

    A job that arrives while others decode joins the batch at the next step; its prompt is prefilled a
    bounded chunk per step, between the batch's decode steps, so a long prompt does not stall the others.
    Loading happens on the generation thread too: MLX streams belong to the thread that made them.

    Under mlx.launch every rank runs an engine; `lockstep` (server/lockstep.py) hands rank 0's changes
    to the others before each step, so all make the same model calls. Only rank 0's has an HTTP side.
    """

    def __init__(self, load: Callable[[], LoadedModel], *, name: str, max_kv_size: int | None = None,
                 kv_bits: int | None = None, prompt_cache_bytes: int = 2 << 30, max_tokens: int | None = None,
                 max_queue: int = 16, max_batch: int = 8, prefill_step: int | None = None,
                 allow_scripted: bool = False,
                 prompt_cache_dir: str | Path | None = None, prompt_cache_disk_bytes: int = 0, lockstep=None):
        if max_queue < 0:
            raise QwenMLXError(f"--max-queue {max_queue}: must be 0 or more")
        if max_batch < 1:
            raise QwenMLXError(f"--max-batch {max_batch}: must be at least 1")
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
        self.max_tokens, self.max_queue, self.max_batch = max_tokens, max_queue, max_batch
        self.allow_scripted, self.lockstep = allow_scripted, lockstep
        if lockstep is not None and prompt_cache_dir is not None:
            raise QwenMLXError(f"--prompt-cache-dir {prompt_cache_dir}: not under mlx.launch (each rank would need "
                               "its own files, found alike on every rank); the prompt cache in memory still works")
        disk = DiskCache(prompt_cache_dir, prompt_cache_disk_bytes) if prompt_cache_dir is not None else None
        self.prompt_cache = PromptCache(prompt_cache_bytes, disk)
        self.state = "loading"  # then "ready"; or "failed" with error (loading failed, or under mlx.launch a step)
        self.error: Exception | None = None
        self.model = self.tokenizer = None
        self.namespace = ""
        self.waiting = 0
        self.running: list[Sequence] = []  # the batch, in arrival order
        self._queue: queue.Queue = queue.Queue()
        self._stopping, self._ended = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="qwenmlx-generation", daemon=True)

    def start(self, on_ready: Callable[[], None] = lambda: None,
              on_error: Callable[[Exception], None] = lambda e: None) -> None:
        self._on_ready, self._on_error = on_ready, on_error
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step (on every rank under mlx.launch)."""
        self._stopping.set()
        self._queue.put(None)  # wakes a thread waiting for work

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the generation thread has stopped (or failed); False if it has not within timeout seconds."""
        return self._ended.wait(timeout)

    @property
    def split(self) -> dict:
        """world_size and the parallel mode (None on one rank), as generate --json reports them; /health shows them."""
        return self.lockstep.ranks.describe() if self.lockstep is not None else {"world_size": 1, "parallel": None}

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    # The caller's side.

    def render(self, request: Request) -> tuple[list[int], bool]:
        """The request's prompt as token ids, and whether the model will think; RequestError if it cannot be."""
        if self.state != "ready":
            raise self._unavailable()
        tokenizer, param = self.tokenizer, "messages" if request.messages is not None else "prompt"
        try:
            if request.messages is None:
                return tokenizer.encode_prompt(request.prompt), False  # the client wrote the markers it wants
            thinking = thinking_switch(request.messages) if request.thinking is None else request.thinking
            prompt = tokenizer.apply_chat_template(request.messages, enable_thinking=thinking,
                                                   tools=request.tools or None, tokenize=True)
            return prompt, tokenizer.thinks(thinking)  # a 2507 model's template decides alone
        except QwenMLXError as e:
            raise RequestError(str(e), param) from None

    def prepare(self, request: Request, loop: asyncio.AbstractEventLoop) -> Job:
        """Check and render a request; RequestError says what is wrong with it."""
        prompt, thinking = self.render(request)
        param = "messages" if request.messages is not None else "prompt"
        try:
            sampling = default_sampling(thinking, self.tokenizer.generation_config, **request.sampling)
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
            if self.state != "ready":  # it failed since the job was prepared
                raise self._unavailable()
            if self.waiting >= self.max_queue:
                raise Unavailable(f"the server is busy ({self.waiting} requests waiting); retry shortly",
                                  "queue_full")
            self.waiting += 1
        self._queue.put(job)

    def _unavailable(self) -> Unavailable:
        if self.state == "loading":
            return Unavailable("the model is still loading", "model_not_ready")
        if self.model is None:
            return Unavailable("the model failed to load", "model_not_ready")
        return Unavailable(f"the server stopped after an error ({self.error})", "server_failed")

    # The generation thread.

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # loading failed, or under mlx.launch a step did (see _guarded)
            with self._lock:  # no job is queued from now on
                self.state, self.error = "failed", e
            for job in [s.job for s in self.running] + [job for job in self._queue.queue if job is not None]:
                job.send(Failed(500, f"internal error: {e}"))  # their clients are not left waiting
            self._on_error(e)
        self._ended.set()
        # The thread stays until the process ends: as a thread ends, MLX frees its thread-local compile cache,
        # which takes the GIL, and if Python is finalizing by then the process aborts (std::terminate).
        threading.Event().wait()

    def _serve(self) -> None:
        loaded = self._load()
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if self.max_batch > 1 and not decodes_in_a_batch(self.model):
            log.info("SelfExtend and dual chunk attention decode one request at a time (--max-batch 1)")
            self.max_batch = 1
        # A pipeline rank holds its layers' caches alone: its share of the budget keeps the entries every rank keeps.
        share = len(self.model.layers), self.model.config.num_hidden_layers
        self.prompt_cache.max_bytes = self.prompt_cache.max_bytes * share[0] // share[1]
        self.namespace = f"{loaded.key}|max_kv_size={self.max_kv_size}|kv_bits={self.kv_bits}"
        self.budget_tokens = self.tokenizer.encode(THINKING_BUDGET_TEXT)
        self.state = "ready"
        self._on_ready()
        while True:
            changes = self._changes() if self.lockstep is None else self.lockstep.share(self._changes)
            if changes.stop:
                return
            for sequence in [self.running[i] for i in changes.cancelled]:
                self._finish(sequence, "cancelled")
            for job in changes.jobs:
                self._guarded([job], lambda job=job: self.running.append(Sequence(self, job)))
            self._step()

    def _changes(self) -> Changes:
        """The jobs that cancelled, and waiting jobs to start while the batch has room (waiting for one when it is
        empty). Time decides what is seen here, so under mlx.launch rank 0 alone calls it and shares the answer."""
        changes = Changes(cancelled=[i for i, s in enumerate(self.running) if s.job.cancelled.is_set()])
        room = self.max_batch - len(self.running) + len(changes.cancelled)
        while len(changes.jobs) < room and not self._stopping.is_set():
            try:  # idle under mlx.launch, a tick at a time: the other ranks wait for each word (Lockstep)
                job = self._queue.get(block=not self.running and not changes.jobs,
                                      timeout=IDLE_TICK_SECONDS if self.lockstep else None)
            except queue.Empty:
                changes.idle = not self.running and not changes.jobs
                break
            if job is None:
                break
            with self._lock:
                self.waiting -= 1
            if job.cancelled.is_set():
                log.info("%s: cancelled while waiting", job.request.id)
                continue
            changes.jobs.append(job)
        changes.stop = self._stopping.is_set()
        return changes

    def _step(self) -> None:
        """One chunk of one prompt's prefill, then one decode step for every sequence past its prefill."""
        prefilling = [s for s in self.running if s.to_prefill]
        if prefilling:
            self._guarded([prefilling[0].job], prefilling[0].prefill_chunk)
        decoding = [s for s in self.running if not s.to_prefill]
        if decoding:
            self._guarded([s.job for s in decoding], lambda: self._decode(decoding))

    def _decode(self, decoding: list["Sequence"]) -> None:
        """One decode step for the batch: feed each sequence the token it sampled last step and sample the next
        (in one forward pass; forced thinking-budget text alone), and, while that computes, read and send the
        tokens sampled last step, as stream_generate overlaps the model with its caller."""
        fed = [s for s in decoding if not s.forced and not s.pending_is_last]
        alone = [s for s in decoding if s.forced]
        sampled, rows = {}, []
        if fed:
            inputs = mx.concatenate([s.input_token() for s in fed])
            logits = decode_step(self.model, inputs, [s.caches for s in fed])
            for sequence in fed:
                sequence.checkpoint_prompt()
            sampled = greedy_tokens(fed, logits, self.model)
            rows = [(s, logits[i]) for i, s in enumerate(fed) if s not in sampled]
        rows += [(s, s.feed_forced()) for s in alone]
        for sequence, row in rows:
            sampled[sequence] = self._guarded([sequence.job], lambda s=sequence, row=row: s.sample(row[None]))
        mx.async_eval([pair[0] for pair in sampled.values() if pair is not None])
        for sequence in decoding:
            if sequence.pending is not None:
                reason = self._guarded([sequence.job], sequence.accept)
                if reason:
                    self._finish(sequence, reason)
            if sequence in self.running and not sequence.forced:
                sequence.pending = sampled.get(sequence)

    def _guarded(self, jobs: list[Job], work: Callable):
        """work(), or, if it fails, those jobs failed (the server keeps serving the others). Under mlx.launch a
        failure ends the engine, on every rank: no rank can tell whether the others failed the same step."""
        try:
            return work()
        except Exception as e:
            if self.lockstep is not None:
                raise
            if isinstance(e, MemoryError | RuntimeError):  # MLX reports a failed allocation as RuntimeError
                out_of_memory = isinstance(e, MemoryError) or any(w in str(e).lower() for w in ("memory", "alloc"))
                message = f"out of memory: {e}" if out_of_memory else f"internal error: {e}"
                for job in jobs:
                    log.error("%s failed: %s", job.request.id, e)
                self.prompt_cache.clear()
                mx.clear_cache()
            else:
                message = f"internal error: {type(e).__name__}: {e}"
                for job in jobs:
                    log.error("%s failed:\n%s", job.request.id, traceback.format_exc())
        for job in jobs:
            job.send(Failed(500, message))
            self.running = [s for s in self.running if s.job is not job]
        return None

    def _finish(self, sequence: "Sequence", reason: str) -> None:
        job, prompt, caches = sequence.job, sequence.job.prompt, sequence.caches
        if reason != "cancelled":
            for piece in sequence.reply.finish():
                job.send(piece)
        held = (prompt + sequence.generated)[: caches[0].offset + caches[0].evicted]
        if sequence.generated:  # the caches hold the prompt and the generated tokens they were fed
            self.prompt_cache.store(self.namespace, held, caches, prompt, sequence.checkpoint)
        reply, generated = sequence.reply, len(sequence.generated)
        if reason != "cancelled":
            reason = "stop" if reply.stopped else ("tool_calls" if reply.n_tool_calls else reason)
        decode_seconds = time.perf_counter() - (sequence.first_token_at or time.perf_counter())
        log.info("%s: %s, %d prompt tokens (%d cached), %d generated, %.2f s to the first token, "
                 "%.1f tok/s, %.2f s", job.request.id,
                 "cancelled during prefill" if reason == "cancelled" and sequence.to_prefill else reason,
                 len(prompt), sequence.reused, generated,
                 (sequence.first_token_at or sequence.started_at) - sequence.started_at,
                 (generated - 1) / decode_seconds if generated > 1 and decode_seconds else 0,
                 time.perf_counter() - sequence.started_at)
        self.running.remove(sequence)  # only now: a server that reports nothing running has logged every request
        job.send(Finished(reason, Usage(len(prompt), generated, sequence.reused), reply.stop_sequence))

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


class Sequence:
    """One job in the batch: its caches, what is left of its prompt to prefill, its sampler, reply and stops.

    Each decode step feeds a sequence the token it sampled the step before (first, the prompt's last
    token), samples the next (`pending`, not read yet), then reads and sends the one it fed. So its
    caches hold the prompt and every token sent, and the last one sampled is fed only if it is needed.
    """

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        self.started_at, self.first_token_at = time.perf_counter(), None
        model, tokenizer, request, prompt = engine.model, engine.tokenizer, job.request, job.prompt
        reuse = engine.prompt_cache.fetch(engine.namespace, prompt)
        job.send(Started(len(prompt), reuse.reused))
        self.reused = reuse.reused
        self.caches = reuse.caches or make_cache(model, engine.max_kv_size, engine.kv_bits)
        self.to_prefill = prompt[reuse.reused : -1]
        self.pending: tuple[mx.array, mx.array | None] | None = None  # sampled token and its logprobs, unread
        self.forced: list[int] = []  # thinking-budget text to feed before the next token is sampled
        # A rotating cache may evict during the reply: then the prompt's checkpoint must be copied before it.
        self.early_checkpoint = engine.max_kv_size is not None and len(prompt) + job.max_tokens > engine.max_kv_size
        self.checkpoint = None
        self.reply = Reply(tokenizer, prompt, chat=job.chat, tools=bool(request.tools), stop=request.stop)
        self.detokenizer = tokenizer.detokenizer()
        self.thought = Thought(tokenizer.think_start_id, tokenizer.think_end_id, prompt)
        self.generated: list[int] = []
        self.pending_logprobs: list[dict] = []
        if request.scripted:
            scripted = tokenizer.encode(request.scripted.get("reply", ""))
            self.sampler = scripted_sampler(scripted, min(tokenizer.eos_token_ids), request.scripted.get("fail"))
        else:
            self.sampler = make_sampler(job.sampling)
        self.sampler = shared_sampler(model, self.sampler)
        self.use_counts = job.sampling.presence_penalty != 0 or job.sampling.repetition_penalty != 1.0
        self.counts = mx.zeros((model.config.vocab_size,), mx.int32)
        # Its next token is the logits' argmax alone (no penalty, no logprobs, no test script).
        self.argmax_only = (not request.scripted and job.sampling.temperature == 0 and not self.use_counts
                            and request.top_logprobs is None)

    @property
    def pending_is_last(self) -> bool:
        """The pending token will be the last one (max_tokens): nothing comes after it, so it is not fed."""
        return self.pending is not None and len(self.generated) + 1 >= self.job.max_tokens

    def prefill_chunk(self) -> None:
        """Run the next bounded chunk of the prompt into the caches."""
        engine, caches = self.engine, self.caches
        step = engine.prefill_step or prefill_step_for(engine.model, caches[0].offset + len(self.to_prefill))
        chunk, self.to_prefill = self.to_prefill[:step], self.to_prefill[step:]
        engine.model(mx.array(chunk)[None], caches)
        mx.eval([c.state for c in caches])
        mx.clear_cache()

    def input_token(self) -> mx.array:
        """What this step feeds: the pending token (counted for the penalties), or first the prompt's last token."""
        if self.pending is None:
            return mx.array(self.job.prompt[-1:])
        token = self.pending[0]
        if self.use_counts:
            self.counts = self.counts.at[token].add(1)
        return token

    def checkpoint_prompt(self) -> None:
        """After the first step the caches hold exactly the prompt: keep a copy if the reply may evict it."""
        if self.early_checkpoint and self.checkpoint is None:
            self.checkpoint = copy_caches(self.caches)

    def feed_forced(self) -> mx.array:
        """The logits after the forced thinking-budget text, fed alone (it is several tokens)."""
        tokens, self.forced = self.forced, []
        if self.use_counts:
            self.counts = self.counts.at[mx.array(tokens)].add(1)
        return self.engine.model(mx.array(tokens)[None], self.caches)[0, -1]

    def sample(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """The next token (unevaluated) and, when asked for, the log-probabilities it was drawn from."""
        logprobs = None
        if self.job.request.top_logprobs is not None:
            logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
        return self.sampler(logits, self.counts), logprobs

    def accept(self) -> str | None:
        """Read the pending token and send it (and, past the thinking budget, the text that closes the thought);
        say why the sequence ends here ("stop" or "length"), if it does."""
        (token, logprobs), self.pending = self.pending, None
        token = token.item()
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self._take(token, logprobs):
            return self._end_reason(token)
        budget = self.job.request.thinking_budget
        if budget is not None and self.thought.inside and self.thought.length >= budget:
            for forced in self.engine.budget_tokens:  # generated, though not sampled
                if self._take(forced, None):
                    return self._end_reason(forced)
                self.forced.append(forced)
        return None

    def _take(self, token: int, logprobs: mx.array | None) -> bool:
        """Send one generated token's text; True when generation must end after it."""
        engine, request, tokenizer = self.engine, self.job.request, self.engine.tokenizer
        self.generated.append(token)
        self.thought.update(token)
        eos = token in tokenizer.eos_token_ids
        last = eos or len(self.generated) >= self.job.max_tokens
        text = "" if eos else self.detokenizer.add_token(token)
        if last:
            text += self.detokenizer.finalize()
        pieces = self.reply.feed(token, text)
        if logprobs is not None and not self.reply.in_thought:
            self.pending_logprobs.append(engine._token_logprobs(token, logprobs, request.top_logprobs))
        for piece in pieces:
            if isinstance(piece, Text) and piece.kind == "content":
                piece.logprobs, self.pending_logprobs = self.pending_logprobs, []
            self.job.send(piece)
        return last or self.reply.stopped

    def _end_reason(self, token: int) -> str:
        return "stop" if token in self.engine.tokenizer.eos_token_ids or self.reply.stopped else "length"
