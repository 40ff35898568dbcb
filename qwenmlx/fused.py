"""Layers reading the same input joined into one, so each token runs fewer, larger matmuls."""

import copy

import mlx.core as mx
import mlx.nn as nn


def concatenate_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing the outputs of all `layers` side by side; None where their storage differs.

    Fewer, larger matmuls per token. Stacking output rows is exact, quantized or not: each row keeps its groups.
    """

    def storage(m: nn.Module):
        return type(m), getattr(m, "bits", None), getattr(m, "group_size", None), getattr(m, "mode", None), "bias" in m

    if any(storage(m) != storage(layers[0]) for m in layers):
        return None
    fused = copy.copy(layers[0])
    for name in ("weight", "scales", "biases"):
        if layers[0].get(name) is not None:
            fused[name] = mx.concatenate([m[name] for m in layers], axis=-2)
    if "bias" in fused:
        fused["bias"] = mx.concatenate([m["bias"] for m in layers], axis=-1)
    return fused
