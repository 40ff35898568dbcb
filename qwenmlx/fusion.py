"""Projections joined for fewer, larger kernels per token, exactly: the dense MLP, attention and the experts use them."""

import copy
from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


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


def fuse_gate_up(block: nn.Module) -> None:
    fused = concatenate_rows([block.gate_proj, block.up_proj])
    if fused is not None:
        block.gate_up_proj = fused
        del block.gate_proj, block.up_proj


def gate_and_up(block: nn.Module, project) -> tuple[mx.array, mx.array]:
    """The gate and up projections, through project(layer), from one fused layer where there is one."""
    if "gate_up_proj" in block:
        return mx.split(project(block.gate_up_proj), 2, axis=-1)
    return project(block.gate_proj), project(block.up_proj)
