"""Whether a model fits before it is loaded: its weights plus the KV cache at the context a command needs,
against the memory this machine can give MLX (a Mac's recommended working set, elsewhere MemAvailable).

The arithmetic is the summarise strategy's (strategy.Limits over cache.kv_cache_bytes, which `convert --plan`
uses too). The weights are counted from the safetensors headers as load_model will hold them: floating
tensors in the compute dtype (float32 on a CPU, so a bf16 checkpoint takes twice its file size there),
packed quantized ones as stored.
"""

from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from .attention import keys_at_their_index
from .checkpoint import (
    compute_dtype,
    memory_budget_parts,
    weights_in_memory,
)
from .config import ModelConfig, read_config
from .errors import QwenMLXError
from .experts import parse_budget
from .generate import available_memory
from .strategy import Limits, config_limits


def model_limits(model_dir: Path, *, budget: int | None = None, dtype: mx.Dtype | None = None) -> Limits:
    """The model's memory figures before loading it: weights, KV cache per token, and what there is."""
    dtype = dtype or compute_dtype()
    budget = available_memory() if budget is None else budget
    return config_limits(read_config(model_dir), weights_in_memory(model_dir, dtype), dtype.size, budget)


def unbounded_context(config: ModelConfig) -> int:
    """The context checked for a command with no bound: the model's window, but for dual chunk attention
    (Qwen's config_1m.json: 1,010,000 positions) its trained window, 262,144 tokens for the 2507 models; a
    chat that grows past it is one a million-token cache would have refused from the start."""
    if config.dual_chunk_attention_config:
        return config.dual_chunk_attention_config.get("original_max_position_embeddings") or \
            config.max_position_embeddings
    return config.max_position_embeddings


def check_memory(model_dir: Path, context: int | None = None, *, kv_bits: int | None = None, prompt_tokens: int = 0,
                 context_option: str | None = None, kv_bits_option: bool = False, budget: int | None = None,
                 attention: dict | None = None, weights_budget: int | None = None) -> None:
    """Refuse, in one line saying by how much and what would fit, a model whose weights and KV cache do not fit.

    context: the tokens the command may hold (default: unbounded_context); context_option and kv_bits_option:
    the command's flags that shrink the cache, offered when they make it fit. attention: load_model's
    self_extend and dual_chunk; with either (or a config carrying dual chunk attention) the rotating cache
    of --max-kv-size cannot hold the keys (make_cache refuses it), so it is not offered.
    weights_budget: what --memory-budget leaves the weights (see weights_budget).
    """
    config = read_config(model_dir)
    limits = model_limits(model_dir, budget=budget)
    if weights_budget is not None:
        limits = replace(limits, weights_bytes=min(limits.weights_bytes, weights_budget))
    context = context or unbounded_context(config)
    if context_option == "--max-kv-size" and not keys_at_their_index(config, attention):
        context_option = None
    needed = limits.memory_needed(context, kv_bits)
    if needed <= limits.memory_budget:
        return
    kv = needed - limits.weights_bytes
    problem = (f"{model_dir.name} needs {_gb(needed)} (weights {_gb(limits.weights_bytes)} + KV cache {_gb(kv)} "
               f"for {context:,} tokens) and {_gb(limits.memory_budget)} is available: {_gb(needed - limits.memory_budget)}"
               " short")
    fits = []
    if limits.context_fitting(kv_bits) > prompt_tokens and context_option:
        fits.append(f"{context_option} {limits.context_fitting(kv_bits) - prompt_tokens}")
    if kv_bits_option and kv_bits is None and limits.kv_group_size and \
            limits.memory_needed(context, 8) <= limits.memory_budget:
        fits.append("--kv-bits 8")
    parts, streamed = memory_budget_parts(model_dir), _round_down(limits.memory_budget)
    if weights_budget is None and parts.expert_bytes and parts.minimum + kv <= streamed:
        fits.append(f"--memory-budget {_size_option(streamed)} (experts streamed from disk)")
    if limits.context_fitting(kv_bits) == 0:
        fits.append("a smaller recipe (`qwenmlx convert --plan` gives each one's memory) or a smaller model")
    advice = f"; it would fit with {' or '.join(fits)}" if fits else ""
    raise QwenMLXError(f"{problem}{advice}; --no-memory-check loads it anyway")


def weights_budget(model_dir: Path, memory_budget: int | str, context: int | None = None,
                   kv_bits: int | None = None, prompt_cache_bytes: int = 0) -> int:
    """What a memory budget (bytes or "10GB") leaves the weights once the KV cache for `context` tokens
    (default: unbounded_context) and a server's prompt cache are set aside; one that cannot hold the model's
    minimum is refused naming it."""
    total = parse_budget(memory_budget)
    context = context or unbounded_context(read_config(model_dir))
    kv = model_limits(model_dir).kv_cache_bytes(context, kv_bits)
    minimum = memory_budget_parts(model_dir).minimum
    if total - kv - prompt_cache_bytes < minimum:
        kept = f" + prompt cache {_gb(prompt_cache_bytes)}" if prompt_cache_bytes else ""
        raise QwenMLXError(f"memory budget {_gb(total)} is below the {_gb(minimum + kv + prompt_cache_bytes)} "
                           f"{model_dir.name} needs at least: its weights' minimum {_gb(minimum)} + KV cache "
                           f"{_gb(kv)} for {context:,} tokens{kept}")
    return total - kv - prompt_cache_bytes


def summary_context(model_dir: Path, memory_budget: int | str, answer_tokens: int) -> int:
    """The tokens summarise sets the KV cache aside for within a memory budget: the native window, or as
    many as the budget holds beside the weights' minimum; at least the answer's (weights_budget refuses
    a budget short of that)."""
    limits = model_limits(model_dir, budget=parse_budget(memory_budget))
    beside_minimum = replace(limits, weights_bytes=memory_budget_parts(model_dir).minimum)
    return max(min(limits.native_context, beside_minimum.context_fitting(None)), answer_tokens)


def budget_limits(model_dir: Path, memory_budget: int | str, context: int) -> Limits:
    """The summarise strategy's limits within a memory budget: all of it for the weights and the KV cache,
    the weights taking what weights_budget leaves them (so the cache gets the share set aside)."""
    limits = model_limits(model_dir, budget=parse_budget(memory_budget))
    return replace(limits, weights_bytes=weights_budget(model_dir, memory_budget, context))


def _round_down(n_bytes: int) -> int:
    """To 0.1 GB, or below 1 GB to 1 MB."""
    unit = 10**8 if n_bytes >= 10**9 else 10**6
    return n_bytes // unit * unit


def _size_option(n_bytes: int) -> str:
    """A size as --memory-budget takes it: 9.8GB, 750MB."""
    return f"{n_bytes / 10**9:g}GB" if n_bytes >= 10**9 else f"{n_bytes // 10**6}MB"


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3g} GB"
