"""Whether a model fits before it is loaded: its weights plus the KV cache at the context a command needs,
against the memory this machine can give MLX (a Mac's recommended working set, elsewhere MemAvailable).

The arithmetic is the summarise strategy's (strategy.Limits over cache.kv_cache_bytes, which `convert --plan`
uses too). The weights are counted from the safetensors headers as load_model will hold them: floating
tensors in the compute dtype (float32 on a CPU, so a bf16 checkpoint takes twice its file size there),
packed quantized ones as stored.
"""

from pathlib import Path

import mlx.core as mx

from .checkpoint import compute_dtype, weights_in_memory
from .config import read_config
from .errors import QwenMLXError
from .generate import available_memory
from .strategy import Limits, config_limits


def model_limits(model_dir: Path, *, budget: int | None = None, dtype: mx.Dtype | None = None) -> Limits:
    """The model's memory figures before loading it: weights, KV cache per token, and what there is."""
    dtype = dtype or compute_dtype()
    budget = available_memory() if budget is None else budget
    return config_limits(read_config(model_dir), weights_in_memory(model_dir, dtype), dtype.size, budget)


def check_memory(model_dir: Path, context: int | None = None, *, kv_bits: int | None = None, prompt_tokens: int = 0,
                 context_option: str | None = None, kv_bits_option: bool = False, budget: int | None = None) -> None:
    """Refuse, in one line saying by how much and what would fit, a model whose weights and KV cache do not fit.

    context: the tokens the command may hold (default: the model's whole window); context_option and
    kv_bits_option: the command's flags that shrink the cache, offered when they make it fit.
    """
    limits = model_limits(model_dir, budget=budget)
    context = context or read_config(model_dir).max_position_embeddings
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
    if limits.context_fitting(kv_bits) == 0:
        fits.append("a smaller recipe (`qwenmlx convert --plan` gives each one's memory) or a smaller model")
    advice = f"; it would fit with {' or '.join(fits)}" if fits else ""
    raise QwenMLXError(f"{problem}{advice}; --no-memory-check loads it anyway")


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3g} GB"
