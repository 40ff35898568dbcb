"""How to fit a prompt and its answer into one generation: the native window, YaRN, or not at all.

Qwen's guidance: Qwen3 handles 32,768 tokens natively; YaRN stretches that by its factor (2 for 65,536,
4 for 131,072), but static YaRN costs some quality on short texts, so it is enabled only when needed and
with the smallest factor that is enough. Memory is checked too: the weights plus the KV cache at that
length, trying an 8-bit KV cache (about half the size) before giving up on a single pass. Whatever fits
in neither is summarised in parts (map-reduce, in summarize.py). A model loaded with SelfExtend (asked for
by the user, never chosen here) reads its own longer window instead of YaRN. The 2507 models (262,144
native tokens) go past their window with dual chunk attention, Qwen's way for them, up to the 1,010,000
positions of Qwen's config_1m.json, never with YaRN.

Every number comes in through Limits, so the boundaries are testable on a tiny model.
"""

import math
from dataclasses import asdict, dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import KVCache, kv_cache_bytes, kv_elements_per_token, kv_group_size
from .config import QWEN_1M_POSITIONS, QWEN_DUAL_CHUNK
from .errors import QwenMLXError
from .generate import available_memory

SINGLE_PASS, YARN, SELF_EXTEND, DUAL_CHUNK, MAP_REDUCE = (
    "single pass", "YaRN", "SelfExtend", "dual chunk attention", "map-reduce")
MAX_YARN_FACTOR = 4  # Qwen validates YaRN up to 131,072 tokens, factor 4 on 32,768
# Qwen3's config.json declares 40,960 positions, but Qwen documents 32,768 as the native context: the YaRN base.
DOCUMENTED_NATIVE_CONTEXT = {40960: 32768}
KV_CACHE_BITS = (None, 8)  # full precision first; an 8-bit cache when that is what fits in memory


def native_context(config) -> int:
    """The context the model handles without YaRN: the YaRN or dual chunk base if the config names one."""
    original = (config.rope_scaling or config.dual_chunk_attention_config or {}).get(
        "original_max_position_embeddings")
    if original:
        return int(original)
    return DOCUMENTED_NATIVE_CONTEXT.get(config.max_position_embeddings, config.max_position_embeddings)


def yarn_scaling(factor: int | None, native: int) -> dict | None:
    """The rope_scaling Qwen publishes for YaRN, with this factor; None (no YaRN) for no factor."""
    if factor is None:
        return None
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": native}


def self_extend_context(native: int, self_extend: dict) -> int:
    """The tokens SelfExtend keeps within the trained positions: the last query's grouped position < native."""
    group, window = self_extend["group_size"], self_extend["window"]
    if window >= native:
        return native
    return (native - window + window // group) * group


@dataclass
class Limits:
    """What bounds one generation: the native window, and the memory for the weights plus the KV cache."""

    native_context: int
    memory_budget: int  # bytes the weights and the KV cache may take together
    weights_bytes: int
    kv_elements_per_token: int  # keys and values, all layers
    kv_dtype_bytes: int  # an unquantized cache stores the compute dtype
    kv_group_size: int | None  # None: this head_dim cannot have a quantized cache
    self_extend: dict | None = None  # the model's SelfExtend settings, when loaded with them
    dual_chunk_context: int | None = None  # the positions dual chunk attention reads, when the model has it on

    def kv_cache_bytes(self, tokens: int, kv_bits: int | None = None) -> int:
        return kv_cache_bytes(self.kv_elements_per_token, tokens, kv_bits, self.kv_dtype_bytes, self.kv_group_size)

    def memory_needed(self, tokens: int, kv_bits: int | None = None) -> int:
        return self.weights_bytes + self.kv_cache_bytes(tokens, kv_bits)

    def kv_bits_options(self) -> tuple:
        return KV_CACHE_BITS if self.kv_group_size else (None,)

    def longest_context(self) -> int:
        """The most tokens one generation can hold in memory, with the smallest cache on offer."""
        return self.context_fitting(self.kv_bits_options()[-1])

    def context_fitting(self, kv_bits: int | None) -> int:
        """The most tokens a KV cache of kv_bits (None: full precision) can hold in what the weights leave free."""
        free = self.memory_budget - self.weights_bytes
        per_step = self.kv_cache_bytes(KVCache.step, kv_bits)
        return max(free // per_step, 0) * KVCache.step


def limits_for(model, *, native: int | None = None, memory_budget: int | None = None) -> Limits:
    """A loaded model's limits; native and memory_budget override what the config and the OS say."""
    if memory_budget is None:
        # What is still free, plus what MLX already holds (the weights, which the estimate counts).
        memory_budget = available_memory() + mx.get_active_memory()
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if getattr(model, "split", None) is not None:  # split over ranks: all choose by the tightest rank's figures
        memory_budget, weights_bytes = model.split.least(memory_budget), model.split.most(weights_bytes)
    return config_limits(model.config, weights_bytes, model.model.norm.weight.dtype.size, memory_budget, native)


def config_limits(config, weights_bytes: int, dtype_bytes: int, memory_budget: int,
                  native: int | None = None) -> Limits:
    """Limits from a config alone, for weights of a known size computing in a dtype of dtype_bytes."""
    try:
        group_size = kv_group_size(config.head_dim)
    except QwenMLXError:
        group_size = None
    return Limits(
        native_context=native or native_context(config),
        memory_budget=memory_budget,
        weights_bytes=weights_bytes,
        kv_elements_per_token=kv_elements_per_token(config),
        kv_dtype_bytes=dtype_bytes,
        kv_group_size=group_size,
        self_extend=config.self_extend,
        dual_chunk_context=config.max_position_embeddings if config.dual_chunk_attention_config else None,
    )


@dataclass
class Plan:
    """How one generation runs, and why."""

    strategy: str  # SINGLE_PASS, YARN, SELF_EXTEND or MAP_REDUCE
    prompt_tokens: int
    answer_tokens: int  # reserved for the answer (and the thinking, when on)
    native_context: int
    yarn_factor: int | None = None
    kv_bits: int | None = None  # None: full-precision KV cache
    memory_needed: int = 0  # bytes: weights + KV cache at prompt + answer tokens
    memory_budget: int = 0
    self_extend: dict | None = None  # the loaded model's SelfExtend settings (no YaRN then)
    dual_chunk_context: int | None = None  # the loaded model's dual chunk attention reach (no YaRN then)
    fits_tokens: int = 0  # the most tokens memory holds, with the smallest KV cache on offer

    @property
    def longest(self) -> int:
        """The most tokens one generation may hold: SelfExtend's or dual chunk attention's reach, or YaRN's."""
        if self.self_extend:
            return self_extend_context(self.native_context, self.self_extend)
        if self.dual_chunk_context:
            return self.dual_chunk_context
        if self.is_2507:
            return self.native_context  # Qwen takes these past their window with dual chunk attention, not YaRN
        return self.native_context * MAX_YARN_FACTOR

    @property
    def is_2507(self) -> bool:
        """A model trained on the 262,144 positions of the 2507 models."""
        return self.native_context >= QWEN_DUAL_CHUNK["original_max_position_embeddings"]

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.answer_tokens

    def describe(self) -> str:
        """One line for the user: the strategy and the numbers that decided it."""
        tokens = f"{self.prompt_tokens:,} prompt + {self.answer_tokens:,} answer tokens"
        memory = f"{self.memory_needed / 1e9:.3g} GB of {self.memory_budget / 1e9:.3g} GB for weights + KV cache"
        kv = ", 8-bit KV cache" if self.kv_bits == 8 else ""
        if self.strategy == SINGLE_PASS:
            return f"single pass, no YaRN: {tokens} fit the native {self.native_context:,}-token window ({memory}{kv})"
        if self.strategy == YARN:
            window = self.native_context * self.yarn_factor
            return (f"YaRN factor {self.yarn_factor}: {tokens} exceed the native {self.native_context:,} "
                    f"but fit {window:,} ({memory}{kv})")
        if self.strategy == SELF_EXTEND:
            grouping = f"group {self.self_extend['group_size']}, window {self.self_extend['window']:,}"
            return (f"SelfExtend ({grouping}, as asked): {tokens} exceed the native {self.native_context:,} "
                    f"but fit its {self.longest:,} ({memory}{kv})")
        if self.strategy == DUAL_CHUNK:
            return (f"dual chunk attention (Qwen's way past the window of the 2507 models): {tokens} exceed the "
                    f"native {self.native_context:,} but fit its {self.longest:,} ({memory}{kv})")
        if self.context_tokens > self.longest:
            if self.self_extend:
                most = "SelfExtend's window"
            elif self.dual_chunk_context:
                most = "dual chunk attention's reach"
            elif self.is_2507:
                most = f"the native window (dual chunk attention, --dual-chunk, reads {QWEN_1M_POSITIONS:,})"
            else:
                most = f"the most YaRN factor {MAX_YARN_FACTOR} allows"
            return f"map-reduce: {tokens} exceed {self.longest:,}, {most}"
        return (f"map-reduce: {tokens} need {memory}, even with an 8-bit KV cache; "
                f"{self.fits_tokens:,} tokens fit in this memory")

    def to_dict(self) -> dict:
        return {**asdict(self), "context_tokens": self.context_tokens, "description": self.describe()}


def choose_strategy(prompt_tokens: int, answer_tokens: int, limits: Limits) -> Plan:
    """The first that fits: native window, then the smallest YaRN factor (or, on a model loaded with
    SelfExtend or dual chunk attention, their reach); full-precision KV, then 8-bit."""
    context = prompt_tokens + answer_tokens
    factor = max(1, math.ceil(context / limits.native_context))
    plan = Plan(MAP_REDUCE, prompt_tokens, answer_tokens, limits.native_context, memory_budget=limits.memory_budget,
                self_extend=limits.self_extend, dual_chunk_context=limits.dual_chunk_context,
                fits_tokens=limits.longest_context())
    if context > plan.longest:
        return plan
    for kv_bits in limits.kv_bits_options():
        plan.kv_bits, plan.memory_needed = kv_bits, limits.memory_needed(context, kv_bits)
        if plan.memory_needed <= limits.memory_budget:
            if factor == 1:
                plan.strategy = SINGLE_PASS
            elif limits.self_extend:
                plan.strategy = SELF_EXTEND
            elif limits.dual_chunk_context:
                plan.strategy = DUAL_CHUNK
            else:
                plan.strategy, plan.yarn_factor = YARN, factor
            return plan
    return plan
