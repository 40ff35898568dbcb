"""Generating text: chunked prefill into a KV cache, sampling, a pipelined decode loop, stops, thinking budget, stats.

    for step in stream_generate(model, tokenizer, tokenizer.encode("Hello")):
        print(step.text, end="")
    print(step.stats)

The decode loop builds step n+1's graph and starts evaluating it (mx.async_eval) before it hands
token n to the caller, so the model keeps working while the caller prints.
"""

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

import mlx.core as mx

from .cache import make_cache
from .errors import QwenMLXError

# Qwen's published text for closing a thought when the thinking budget runs out.
THINKING_BUDGET_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>.\n\n"
)
DEFAULT_MAX_PREFILL_STEP = 2048
MIN_PREFILL_STEP = 128


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Each sampling setting: the option that sets it, and what it may be.
SAMPLING_RULES = {
    "temperature": ("--temp", "a number >= 0 (0 is greedy)", lambda v: _finite(v) and v >= 0),
    "top_p": ("--top-p", "in (0, 1]", lambda v: _finite(v) and 0 < v <= 1),
    "top_k": ("--top-k", "a whole number >= 0 (0: no top-k filter)", lambda v: _whole(v) and v >= 0),
    "min_p": ("--min-p", "in [0, 1]", lambda v: _finite(v) and 0 <= v <= 1),
    "presence_penalty": ("--presence-penalty", "a finite number", _finite),
    "repetition_penalty": ("--repetition-penalty", "a number > 0 (1: none)", lambda v: _finite(v) and v > 0),
    "seed": ("--seed", "a whole number from 0 to 2**64 - 1", lambda v: v is None or (_whole(v) and 0 <= v < 2**64)),
}


def sampling_problem(name: str, value) -> str | None:
    """What is wrong with one sampling setting ("must be ..., got ..."), or None."""
    _, rule, ok = SAMPLING_RULES[name]
    return None if ok(value) else f"must be {rule}, got {value!r}"


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; temperature 0 is greedy. Penalties look at the tokens generated so far."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name, (option, _, _) in SAMPLING_RULES.items():
            problem = sampling_problem(name, getattr(self, name))
            if problem:
                raise QwenMLXError(f"{option} {problem}")


# Qwen3's published guidance per mode.
QWEN_SAMPLING = {
    True: Sampling(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0),
    False: Sampling(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0),
}


GREEDY = Sampling()


def default_sampling(thinking: bool, generation_config: dict | None = None, **overrides) -> Sampling:
    """Qwen's guidance for the mode, then generation_config.json, then the user's settings (None: not given).

    generation_config.json carries a single set of values, the ones for the model's default mode, so it
    applies to thinking mode only; non-thinking keeps Qwen's non-thinking guidance unless the user says otherwise.
    """
    sampling = QWEN_SAMPLING[thinking]
    if thinking and generation_config:
        known = {k: generation_config[k] for k in ("temperature", "top_p", "top_k", "min_p")
                 if generation_config.get(k) is not None}
        if generation_config.get("do_sample") is False:
            known["temperature"] = 0.0
        for name, value in known.items():
            problem = sampling_problem(name, value)
            if problem:
                raise QwenMLXError(f"generation_config.json: {name} {problem}")
        sampling = replace(sampling, **known)
    return replace(sampling, **{k: v for k, v in overrides.items() if v is not None})


def prompt_messages(text: str, system: str | None = None) -> list[dict]:
    """A one-turn conversation: the system prompt (none if empty) and the user's text, which must say something."""
    if not text.strip():
        raise QwenMLXError("the prompt is empty: give some text with --prompt (or - and text on stdin)")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def check_generation(max_tokens: int, thinking_budget: int | None = None, prefill_step: int | None = None,
                     **sampling) -> None:
    """Raise QwenMLXError for a generation setting out of range; the CLI calls it before loading any model.

    thinking_budget 0 closes the thought at once; sampling takes Sampling's fields (None: not given).
    """
    if not _whole(max_tokens) or max_tokens < 1:
        raise QwenMLXError(f"--max-tokens must be at least 1, got {max_tokens!r}")
    if thinking_budget is not None and (not _whole(thinking_budget) or thinking_budget < 0):
        raise QwenMLXError(f"--thinking-budget must be 0 (close the thought at once) or more, got {thinking_budget!r}")
    if prefill_step is not None and (not _whole(prefill_step) or prefill_step < 1):
        raise QwenMLXError(f"--prefill-step must be at least 1, got {prefill_step!r}")
    Sampling(**{k: v for k, v in sampling.items() if v is not None})


def shared_sampler(model, sample: Callable[[mx.array, mx.array], mx.array]) -> Callable[[mx.array, mx.array], mx.array]:
    """sample, or for a model split over ranks (distributed.py) the same whose token is rank 0's on every rank."""
    split = getattr(model, "split", None)
    return sample if split is None else split.rank_0_samples(sample)


def make_sampler(sampling: Sampling) -> Callable[[mx.array, mx.array], mx.array]:
    """(logits [1, vocab], counts of generated tokens [vocab]) -> next token [1]; transformers' filter order."""
    key = mx.random.key(sampling.seed) if sampling.seed is not None else None

    def sample(logits: mx.array, counts: mx.array) -> mx.array:
        nonlocal key
        logits = apply_penalties(logits, counts, sampling)
        if sampling.temperature == 0:
            return mx.argmax(logits, axis=-1)
        logits = logits / sampling.temperature
        candidates = None
        if 0 < sampling.top_k < logits.shape[-1]:  # continue with the k best only: no sort over the vocabulary
            candidates = mx.argpartition(-logits, kth=sampling.top_k - 1, axis=-1)[..., : sampling.top_k]
            logits = mx.take_along_axis(logits, candidates, axis=-1)
        if sampling.top_p < 1.0:
            logits = apply_top_p(logits, sampling.top_p)
        if sampling.min_p > 0:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            threshold = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(sampling.min_p))
            logits = mx.where(logprobs < threshold, -float("inf"), logits)
        if key is None:
            choice = mx.random.categorical(logits)
        else:
            key, step_key = mx.random.split(key)
            choice = mx.random.categorical(logits, key=step_key)
        if candidates is None:
            return choice
        return mx.take_along_axis(candidates, choice[..., None], axis=-1).squeeze(-1)

    return sample


def apply_penalties(logits: mx.array, counts: mx.array, sampling: Sampling) -> mx.array:
    """Repetition penalty (CTRL / transformers: divide positive logits, multiply negative) and presence penalty."""
    seen = counts > 0
    if sampling.repetition_penalty != 1.0:
        p = sampling.repetition_penalty
        logits = mx.where(seen, mx.where(logits < 0, logits * p, logits / p), logits)
    if sampling.presence_penalty:
        logits = logits - sampling.presence_penalty * seen
    return logits


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits = mx.sort(logits, axis=-1)  # ascending
    probs = mx.softmax(sorted_logits, axis=-1)
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    n_dropped = (mass_above >= top_p).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logits, mx.minimum(n_dropped, logits.shape[-1] - 1), axis=-1)
    return mx.where(logits < threshold, -float("inf"), logits)


@dataclass
class Stats:
    """One run's figures; prefill time runs until the first new token is known."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = ""  # "stop", "length" or "interrupted"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # The first token comes out of prefill; decode speed is over the ones after it.
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_tps": round(self.prefill_tps, 2), "decode_tps": round(self.decode_tps, 2)}


def available_memory() -> int:
    """Bytes that can still be allocated: the GPU working set on a Mac, MemAvailable on Linux."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return info["max_recommended_working_set_size"] - mx.get_active_memory()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def available_memory_for(model) -> int:
    """available_memory(); for a model split over ranks, the least any rank has, so all cut the same chunks."""
    split = getattr(model, "split", None)
    return available_memory() if split is None else split.least(available_memory())


def prefill_step_for(model, context_tokens: int, memory: int | None = None) -> int:
    """The largest prefill chunk whose transient buffers fit in half the available memory at this context length.

    Per query token a chunk holds attention scores over the whole context (with the softmax, three
    float32 copies per head) and the MLP / experts' activations. A 2,048-token step at 20K of context
    is ~16 GB of scores for Qwen3-30B-A3B, which is what runs a 32 GB Mac out of memory.
    """
    c = model.config
    memory = available_memory_for(model) if memory is None else memory
    hidden = c.moe_intermediate_size * c.num_experts_per_tok if c.num_experts else c.intermediate_size
    per_token = 4 * (3 * c.num_attention_heads * context_tokens + 3 * hidden + 8 * c.hidden_size + c.vocab_size)
    step = (memory // 2) // per_token
    step = 1 << max(int(step).bit_length() - 1, 0)  # a power of two, rounded down
    return max(MIN_PREFILL_STEP, min(DEFAULT_MAX_PREFILL_STEP, step))


def prefill(model, cache: list, tokens: list[int], step: int | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> None:
    """Run tokens into the cache `step` at a time; only the cache is evaluated, so no logits are computed."""
    if not tokens:
        return
    step = step or prefill_step_for(model, cache[0].offset + len(tokens))
    for start in range(0, len(tokens), step):
        chunk = tokens[start : start + step]
        model(mx.array(chunk)[None], cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        if on_progress:
            on_progress(start + len(chunk), len(tokens))


class Thought:
    """Tracks whether the tokens are inside <think>...</think> and how long the current thought is."""

    def __init__(self, start_id: int | None, end_id: int | None, prompt: Iterable[int] = ()):
        self.start_id, self.end_id = start_id, end_id
        self.inside, self.length = False, 0
        for token in prompt:  # a template may open the thought in the prompt
            self.update(token)
        self.length = 0

    def update(self, token: int) -> bool:
        """Feed one token; True when it belongs to the thought (markers included)."""
        if token == self.start_id:
            self.inside, self.length = True, 0
            return True
        if self.inside:
            self.inside = token != self.end_id
            self.length += 1
            return True
        return False


def generate_tokens(
    model, prompt_tokens: list[int], *, cache: list | None = None, sampling: Sampling = GREEDY,
    max_tokens: int = 256, stop_ids: Iterable[int] = (), thinking_budget: int | None = None,
    budget_tokens: list[int] = (), think_ids: tuple = (None, None), prefill_step: int | None = None,
    on_prefill_progress: Callable[[int, int], None] | None = None, stats: Stats | None = None,
    sampler: Callable[[mx.array, mx.array], mx.array] | None = None, logprobs: list | None = None,
) -> Iterator[tuple[int, bool]]:
    """Yield (token, in_thought) for each new token until a stop token or max_tokens.

    When the generator ends, however it ends (a stop, max_tokens, the caller closing it), the cache holds
    the prompt plus every yielded token but the last. After thinking_budget tokens of thought,
    budget_tokens (which close the thought) are forced in and yielded, then sampling resumes.
    sampler replaces the one `sampling` describes. A `logprobs` list gets, before each token is yielded,
    the log-probabilities over the vocabulary it was sampled from ([vocab], unevaluated; None for a forced token).
    """
    if not prompt_tokens:
        raise ValueError("generate_tokens needs at least one prompt token")
    check_generation(max_tokens, thinking_budget, prefill_step)
    cache = make_cache(model) if cache is None else cache
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_tokens)
    stop_ids = frozenset(stop_ids)
    sample = shared_sampler(model, sampler or make_sampler(sampling))
    use_counts = sampling.presence_penalty != 0 or sampling.repetition_penalty != 1.0
    counts = mx.zeros((model.config.vocab_size,), mx.int32)
    thought = Thought(*think_ids, prompt_tokens)
    unyielded_logprobs = []  # of the sampled tokens not yet yielded, in order

    def forward(tokens: mx.array, generated: bool) -> mx.array:
        nonlocal counts
        if use_counts and generated:
            counts = counts.at[tokens].add(1)
        logits = model(tokens[None], cache)[:, -1, :]
        if logprobs is not None:
            unyielded_logprobs.append((logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0])
        return sample(logits, counts)

    for c in cache:
        c.prompt_end = c.offset + len(prompt_tokens)
    mx.reset_peak_memory()
    start = time.perf_counter()
    prefill(model, cache, prompt_tokens[:-1], prefill_step, on_prefill_progress)
    y = forward(mx.array(prompt_tokens[-1:]), generated=False)
    mx.async_eval(y)
    n_yielded = n_fed = 0
    stats.finish_reason = "interrupted"
    try:
        while True:
            next_y = None
            if n_yielded + 1 < max_tokens:
                next_y = forward(y, generated=True)
                n_fed += 1
                mx.async_eval(next_y)
            token = y.item()
            if n_yielded == 0:
                stats.prefill_seconds = time.perf_counter() - start
                start = time.perf_counter()
            n_yielded += 1
            stats.generated_tokens = n_yielded
            if logprobs is not None:
                logprobs.append(unyielded_logprobs.pop(0))
            yield token, thought.update(token)
            if token in stop_ids or next_y is None:
                stats.finish_reason = "stop" if token in stop_ids else "length"
                break
            if thinking_budget is not None and thought.inside and thought.length >= thinking_budget:
                unyielded_logprobs[-1:] = []  # the sampled token is replaced
                next_y = forward(mx.array(budget_tokens), generated=True)
                n_fed += len(budget_tokens)
                mx.async_eval(next_y)
                for forced in budget_tokens[: max_tokens - n_yielded]:
                    n_yielded += 1
                    stats.generated_tokens = n_yielded
                    if logprobs is not None:
                        logprobs.append(None)
                    yield forced, thought.update(forced)
                if n_yielded >= max_tokens:
                    stats.finish_reason = "length"
                    break
            y = next_y
    finally:
        extra = n_fed - max(n_yielded - 1, 0)
        if extra > 0:  # tokens fed ahead of what the caller saw
            for c in cache:
                c.trim(extra)
        if n_yielded:
            stats.decode_seconds = time.perf_counter() - start
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9


@dataclass
class Step:
    """One generated token with its new text; stats is the run's Stats, complete after the last step."""

    token: int
    text: str
    thinking: bool
    stats: Stats = field(repr=False)


def stream_generate(
    model, tokenizer, prompt_tokens: list[int], *, cache: list | None = None, sampling: Sampling | None = None,
    max_tokens: int = 256, thinking_budget: int | None = None, prefill_step: int | None = None,
    on_prefill_progress: Callable[[int, int], None] | None = None,
    sampler: Callable[[mx.array, mx.array], mx.array] | None = None, logprobs: list | None = None,
) -> Iterator[Step]:
    """generate_tokens with the tokenizer's stop tokens, thinking markers and text; the final text is in the last step."""
    stats = Stats()
    detokenizer = tokenizer.detokenizer()
    tokens = generate_tokens(
        model, prompt_tokens, cache=cache, sampling=sampling or default_sampling(True, tokenizer.generation_config),
        max_tokens=max_tokens, stop_ids=tokenizer.eos_token_ids, thinking_budget=thinking_budget,
        budget_tokens=tokenizer.encode(THINKING_BUDGET_TEXT), prefill_step=prefill_step,
        think_ids=(tokenizer.think_start_id, tokenizer.think_end_id),
        on_prefill_progress=on_prefill_progress, stats=stats, sampler=sampler, logprobs=logprobs,
    )
    try:
        for token, thinking in tokens:
            last = token in tokenizer.eos_token_ids or stats.generated_tokens >= max_tokens
            text = "" if token in tokenizer.eos_token_ids else detokenizer.add_token(token)
            yield Step(token, text + detokenizer.finalize() if last else text, thinking, stats)
    finally:
        tokens.close()
