"""Rotary position embeddings, plain or YaRN-scaled, computed exactly as transformers does.

The frequencies are computed once here and handed to mx.fast.rope, MLX's fused kernel
(Metal on a Mac). YaRN's attention factor multiplies q and k in transformers (it scales
cos and sin); the model folds its square into the attention scale, which is the same product.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import QwenMLXError


def yarn_inv_freq(
    head_dim: int, theta: float, scaling: dict, max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    """transformers' _compute_yarn_parameters: (inv_freq as float32, attention factor)."""
    factor = scaling.get("factor")
    original_max = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original_max
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations):
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid dividing by zero

    pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    inv_freq_extrapolation = np.float32(1.0) / pos_freqs
    inv_freq_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = np.float32(1.0) - ramp
    inv_freq = (
        inv_freq_interpolation * (np.float32(1.0) - extrapolation_weight)
        + inv_freq_extrapolation * extrapolation_weight
    )
    return inv_freq.astype(np.float32), float(attention_factor)


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)


def rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


class RoPE(nn.Module):
    """Rotates the first head_dim features of (B, heads, L, head_dim) by position."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int):
        super().__init__()
        self.head_dim = head_dim
        kind = rope_type(scaling)
        if kind == "default":
            inv_freq, self.attention_factor = default_inv_freq(head_dim, theta), 1.0
        elif kind == "yarn":
            inv_freq, self.attention_factor = yarn_inv_freq(head_dim, theta, scaling, max_position_embeddings)
        else:
            raise QwenMLXError(f"rope_scaling: unsupported rope_type {kind!r} (qwenmlx supports yarn)")
        # mx.fast.rope takes wavelengths-per-radian (1 / inv_freq); underscore keeps it out of the weights.
        self._freqs = mx.array(1.0 / inv_freq.astype(np.float64), dtype=mx.float32)

    @classmethod
    def for_config(cls, c) -> "RoPE":
        """The rotation a model config (config.ModelConfig) asks for, YaRN included."""
        return cls(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )

    def at(self, x: mx.array, positions: mx.array) -> mx.array:
        """(B, heads, L, head_dim) rotated token by token to positions [L]: each token alone on the batch axis."""
        B, H, L, D = x.shape
        tokens = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
        rotated = self(tokens, mx.tile(positions.astype(mx.int32), B))
        return rotated.reshape(B, L, H, D).transpose(0, 2, 1, 3)
