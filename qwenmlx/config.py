"""The model's config.json, read into a dataclass and checked before any weight is touched."""

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import QwenMLXError
from .rope import rope_type

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    head_dim: int | None = None
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # MoE fields: absent (or num_experts 0) for dense Qwen3.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    # mlx-lm's layout: {"bits", "group_size", "mode", "<module path>": {...} | False}.
    quantization: dict | None = None
    # Not in Qwen's config.json: set by load(path, self_extend=...) (see attention.py).
    self_extend: dict | None = None
    # Qwen's config_1m.json (the 2507 models past 262,144 tokens): dual chunk attention (see attention.py).
    dual_chunk_attention_config: dict | None = None
    # Not in Qwen's config.json: set by load(path, sparse_prefill=True) (see attention.SparsePrefill).
    sparse_prefill: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Which layers use the sparse MoE block, by transformers' rule."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


def _required_fields(model_type: str) -> list[str]:
    names = [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "rms_norm_eps", "max_position_embeddings",
    ]
    if model_type == "qwen3_moe":
        names += ["num_experts", "num_experts_per_tok", "moe_intermediate_size"]
    return names


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig, naming the offending field when the dict cannot describe a model."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QwenMLXError(
            f"{source}: unsupported model_type {model_type!r} "
            f"(qwenmlx runs {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    raw = dict(raw)
    if raw.get("num_experts") is None and raw.get("num_local_experts") is not None:
        raw["num_experts"] = raw["num_local_experts"]  # the name transformers >= 5 writes
    for name in _required_fields(model_type):
        if raw.get(name) is None:
            raise QwenMLXError(f"{source}: missing field '{name}' for model_type {model_type!r}")

    values = raw
    # transformers >= 5 keeps theta and the scaling under rope_parameters.
    rope_parameters = values.get("rope_parameters") or {}
    if "rope_theta" in rope_parameters and "rope_theta" not in values:
        values["rope_theta"] = rope_parameters["rope_theta"]
    if values.get("rope_scaling") is None and rope_parameters.get(
        "rope_type", rope_parameters.get("type", "default")
    ) != "default":
        values["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    if values.get("head_dim") is None:
        values.pop("head_dim", None)
    if "quantization" not in values and _is_mlx_quantization(values.get("quantization_config")):
        values["quantization"] = values["quantization_config"]

    known = {f.name for f in fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in values.items() if k in known})
    _check_shapes(config, source)
    return config


def _is_mlx_quantization(section: Any) -> bool:
    return isinstance(section, dict) and "bits" in section and "group_size" in section


def _check_shapes(c: ModelConfig, source: str) -> None:
    def fail(name: str, why: str):
        _fail(source, name, why)

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) <= 0:
            fail(name, f"must be a positive integer, got {getattr(c, name)!r}")
    if c.num_attention_heads % c.num_key_value_heads:
        fail("num_key_value_heads",
             f"({c.num_key_value_heads}) must divide num_attention_heads ({c.num_attention_heads})")
    if c.head_dim % 2:
        fail("head_dim", f"must be even for RoPE, got {c.head_dim}")
    if c.model_type == "qwen3_moe":
        if not 0 < c.num_experts_per_tok <= c.num_experts:
            fail("num_experts_per_tok",
                 f"({c.num_experts_per_tok}) must be between 1 and num_experts ({c.num_experts})")
        if c.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", f"must be a positive integer, got {c.moe_intermediate_size!r}")
        if c.decoder_sparse_step <= 0:
            fail("decoder_sparse_step", f"must be a positive integer, got {c.decoder_sparse_step!r}")
    else:
        c.num_experts = 0
    if not _positive_number(c.rope_theta):
        fail("rope_theta", f"must be a positive number, got {c.rope_theta!r}")
    if not _positive_number(c.rms_norm_eps):
        fail("rms_norm_eps", f"must be a positive number, got {c.rms_norm_eps!r}")
    if c.rope_scaling is not None:
        _check_rope_scaling(c.rope_scaling, fail)
    if c.dual_chunk_attention_config is not None:
        _check_dual_chunk(c.dual_chunk_attention_config, c.rope_scaling, fail)


def _positive_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_rope_scaling(scaling: Any, fail) -> None:
    """The YaRN settings Qwen publishes (transformers reads them the same way); plain RoPE needs none."""
    if not isinstance(scaling, dict):
        fail("rope_scaling", f"must be an object or null, got {scaling!r}")
    kind = rope_type(scaling)
    if kind not in ("default", "yarn"):
        fail("rope_scaling", f"has rope_type {kind!r}; qwenmlx supports yarn")
    factor = scaling.get("factor")
    if factor is not None and not (_positive_number(factor) and factor >= 1):
        fail("rope_scaling", f"has YaRN factor {factor!r}; it must be a number >= 1")
    original = scaling.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original <= 0):
        fail("rope_scaling", f"has original_max_position_embeddings {original!r}; it must be a positive integer")


def _check_dual_chunk(section: Any, rope_scaling: dict | None, fail) -> None:
    """The fields vLLM's dual-chunk attention reads: chunk_size > local_size >= 0, original_max_position_embeddings."""
    name = "dual_chunk_attention_config"
    if not isinstance(section, dict):
        fail(name, f"must be an object or null, got {section!r}")
    chunk, local = section.get("chunk_size"), section.get("local_size")
    original = section.get("original_max_position_embeddings", 0)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (chunk, local, original)):
        fail(name, f"needs whole numbers chunk_size, local_size and original_max_position_embeddings, got {section!r}")
    if not 0 <= local < chunk or original < 0:
        fail(name, f"needs chunk_size > local_size >= 0 and original_max_position_embeddings >= 0, got {section!r}")
    if rope_type(rope_scaling) != "default":
        fail(name, "cannot be combined with rope_scaling (YaRN): dual chunk attention keeps every position trained")


# Qwen's config_1m.json for the 2507 models (as for Qwen2.5-1M): chunks of the 262,144 trained positions.
QWEN_DUAL_CHUNK = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}
QWEN_1M_POSITIONS = 1010000


def with_qwen_dual_chunk(c: ModelConfig, source: str) -> None:
    """What Qwen's config_1m.json changes, on a config without it: dual chunk attention on, 1,010,000 positions."""
    if c.dual_chunk_attention_config:
        return
    if c.max_position_embeddings < QWEN_DUAL_CHUNK["chunk_size"]:
        raise QwenMLXError(
            f"{source}: --dual-chunk applies Qwen's settings for models trained on 262,144 positions (the 2507 "
            f"models); this one has {c.max_position_embeddings:,} (for it: YaRN, or --self-extend)")
    _check_dual_chunk(QWEN_DUAL_CHUNK, c.rope_scaling, lambda name, why: _fail(source, name, why))
    c.dual_chunk_attention_config = dict(QWEN_DUAL_CHUNK)
    c.max_position_embeddings = max(c.max_position_embeddings, QWEN_1M_POSITIONS)


def _fail(source: str, name: str, why: str):
    raise QwenMLXError(f"{source}: field '{name}' {why}")


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise QwenMLXError(f"{path}: no config.json in the model directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenMLXError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise QwenMLXError(f"{path}: expected a JSON object")
    return config_from_dict(raw, source=str(path))
