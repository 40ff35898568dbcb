"""Quantizing one weight, exactly as nn.QuantizedLinear / mlx-lm do, and knowing the result's shapes in advance."""

import mlx.core as mx

from qwenmlx.errors import QwenMLXError

from .recipes import AFFINE_GROUP_SIZES, QuantParams


def quantized_shapes(name: str, shape: tuple[int, ...], params: QuantParams,
                     float_dtype: mx.Dtype) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    """{suffix: (shape, dtype)} of what mx.quantize makes of a [..., out, in] weight, without computing it.

    Affine stores uint32-packed weights plus scales and biases in the float dtype; the float modes
    store uint8 shared exponents and no biases.
    """
    *lead, out_dims, in_dims = shape
    if in_dims % params.group_size:
        raise QwenMLXError(f"{name}: group size {params.group_size} does not divide its input dimension "
                           f"{in_dims} (shape {tuple(shape)}); {_group_size_advice(in_dims, params)}")
    if (in_dims * params.bits) % 32:
        raise QwenMLXError(f"{name}: {params.bits}-bit packing needs the input dimension {in_dims} "
                           "to fill whole 32-bit words")
    scale_shape = (*lead, out_dims, in_dims // params.group_size)
    parts = {"weight": ((*lead, out_dims, in_dims * params.bits // 32), mx.uint32)}
    if params.mode == "affine":
        parts["scales"] = (scale_shape, float_dtype)
        parts["biases"] = (scale_shape, float_dtype)
    else:
        parts["scales"] = (scale_shape, mx.uint8)
    return parts


def _group_size_advice(in_dims: int, params: QuantParams) -> str:
    """Which group size would divide in_dims, or how to keep the weight unquantized instead."""
    fits = " or ".join(str(g) for g in AFFINE_GROUP_SIZES if in_dims % g == 0)
    if params.mode == "affine" and fits:
        return f"--group-size {fits} would (group_size in a recipe file)"
    return "no group size fits it: keep it unquantized with a recipe rule (keep = true)"


def quantize(w: mx.array, params: QuantParams) -> dict[str, mx.array]:
    """{"weight", "scales"[, "biases"]} of w, quantized along its last axis."""
    weight, scales, *biases = mx.quantize(w, params.group_size, params.bits, mode=params.mode)
    parts = {"weight": weight, "scales": scales}
    if biases:
        parts["biases"] = biases[0]
    return parts


def dequantize(parts: dict[str, mx.array], params: QuantParams) -> mx.array:
    return mx.dequantize(parts["weight"], parts["scales"], parts.get("biases"),
                         params.group_size, params.bits, mode=params.mode)


def squared_error(w: mx.array, parts: dict[str, mx.array], params: QuantParams) -> tuple[mx.array, mx.array]:
    """(‖W − Q(W)‖², ‖W‖²) in float32: summed over tensors, they give the relative error of a module kind."""
    w32 = w.astype(mx.float32)
    diff = w32 - dequantize(parts, params).astype(mx.float32)
    return (diff * diff).sum(), (w32 * w32).sum()

