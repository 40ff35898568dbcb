"""Several machines: one model split over the processes `mlx.launch` starts, through MLX's own mx.distributed.

Every rank runs the same command on the same inputs, in lockstep, and computes the same logits, so every
rank samples the same token from the same random state (rank 0's seed). Rank 0 alone writes to the
terminal. `shard(model, group, mode)` splits the built model before its weights are read:

- pipeline: consecutive layers per rank. Rank r receives the hidden state from rank r-1, runs its layers and
  sends the result to rank r+1; the last rank's output is summed over all ranks (the others add zeros), so
  every rank gets it. A rank reads only its own layers' weights. One hidden state crosses each link per step.
- experts: every rank holds 1/N of every expert (and of every dense MLP): its share of the intermediate rows,
  so each token's work splits evenly whichever experts the router picks (whole experts per rank would leave a
  rank idle when the top-k falls elsewhere). One all_sum per layer joins the shares; the router, attention
  and the KV cache are replicated.
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import load_model
from .errors import QwenMLXError
from .model import MLP, ExpertsSwiGLU, Model, SparseMoeBlock

MODES = ("pipeline", "experts")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise QwenMLXError(f"--parallel {mode}: the modes are {', '.join(MODES)}")
    return mode


@dataclass
class Ranks:
    """This process's place among the ranks, and how the model is split over them."""

    group: mx.distributed.Group
    mode: str

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def describe(self) -> dict:
        return {"world_size": self.size, "parallel": self.mode if self.size > 1 else None}


def join(mode: str = "pipeline") -> Ranks:
    """The ranks this process runs among (one when not started by mlx.launch).

    On several ranks, the followers' stdout goes nowhere (rank 0 owns the terminal) and every rank takes
    rank 0's random seed, so sampling at any temperature picks the same token everywhere.
    """
    ranks = Ranks(mx.distributed.init(), check_mode(mode))
    if ranks.size > 1:
        if ranks.rank != 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        seed = mx.random.randint(0, 2**31 - 1, ()) if ranks.rank == 0 else mx.array(0)
        mx.random.seed(all_sum(seed, ranks.group).item())
    return ranks


def all_sum(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """mx.distributed.all_sum on the CPU stream (the only one the ring backend runs on)."""
    return mx.distributed.all_sum(x, group=group, stream=mx.cpu)


@contextmanager
def peers_lost_as_errors(ranks: Ranks) -> Iterator[None]:
    """A rank whose peer stopped or failed ends with one line naming itself, not a traceback."""
    try:
        yield
    except RuntimeError as e:
        if ranks.size > 1 and "[ring]" in str(e):
            raise QwenMLXError(f"rank {ranks.rank}: another rank stopped or failed ({e})") from None
        raise


def check_same_model(fingerprint: str, group: mx.distributed.Group) -> None:
    """Every rank must load the same checkpoint: compare fingerprints before any weight is read."""
    mine = mx.array(list(bytes.fromhex(fingerprint)), dtype=mx.int32)
    every = mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu).tolist()
    differing = [r for r, theirs in enumerate(every) if theirs != every[0]]
    if differing:
        raise QwenMLXError(f"rank {differing[0]} has a different model from rank 0's (config or weights differ): "
                           "every rank needs the same checkpoint")


def layer_ranges(n_layers: int, size: int) -> list[range]:
    """Consecutive layers per rank, as even as can be; the first ranks take the extra layers."""
    if n_layers < size:
        raise QwenMLXError(f"--parallel pipeline: {n_layers} layers cannot be split over {size} ranks "
                           "(use --parallel experts or fewer ranks)")
    base, extra = divmod(n_layers, size)
    counts = [base + (r < extra) for r in range(size)]
    starts = [sum(counts[:r]) for r in range(size)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


def shard(model: Model, group: mx.distributed.Group, mode: str) -> Model:
    """Split a model built lazily (load_model(lazy=True)) over the group, before any weight is read."""
    if group.size() == 1:
        return model
    if check_mode(mode) == "pipeline":
        _shard_layers(model, group)
    else:
        _shard_experts(model, group)
    return model


def load_sharded(model_dir: Path, ranks: Ranks, *, threads: int | None = None,
                 rope_scaling: dict | None = None) -> Model:
    """This rank's part of the model: built lazily, checked against the other ranks, split, then read."""
    model, _ = load_model(model_dir, lazy=True, threads=threads, rope_scaling=rope_scaling)
    check_same_model(model.fingerprint, ranks.group)
    shard(model, ranks.group, ranks.mode)
    for layer in model.layers:  # a layer at a time, as load_model does
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    all_sum(mx.array(1.0), ranks.group).item()  # every rank loaded before any starts work
    return model


# --- pipeline: consecutive layers per rank ---


class PipelineStage(nn.Module):
    """One of this rank's layers; the first receives its input from the previous rank, the last sends on."""

    def __init__(self, layer: nn.Module, group: mx.distributed.Group, receive_from: int | None,
                 send_to: int | None):
        super().__init__()
        self.layer = layer
        self.group, self.receive_from, self.send_to = group, receive_from, send_to

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        if self.receive_from is not None:
            x = mx.distributed.recv_like(x, self.receive_from, group=self.group, stream=mx.cpu)
        h = self.layer(x, cache)
        if self.send_to is not None:
            h = mx.distributed.send(h, self.send_to, group=self.group, stream=mx.cpu)
            if cache is not None and cache.buffers is not None:
                # Prefill evaluates only the caches: tie the send to them so the next rank is not left waiting.
                cache.buffers = mx.depends(cache.buffers, [h])
        return h


class FromLastRank(nn.Module):
    """The final norm, applied to the last rank's hidden state, which an all_sum hands to every rank."""

    def __init__(self, norm: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.norm, self.group = norm, group

    def __call__(self, h: mx.array) -> mx.array:
        if self.group.rank() != self.group.size() - 1:
            h = mx.depends(mx.zeros_like(h), h)  # zeros to add, once this rank's part (its send) is done
        return self.norm(all_sum(h, self.group))


def _shard_layers(model: Model, group: mx.distributed.Group) -> None:
    rank, size = group.rank(), group.size()
    mine = layer_ranges(len(model.layers), size)[rank]
    stages = []
    for i in mine:
        receive_from = rank - 1 if i == mine.start and rank > 0 else None
        send_to = rank + 1 if i == mine.stop - 1 and rank < size - 1 else None
        stages.append(PipelineStage(model.layers[i], group, receive_from, send_to))
    model.model.layers = stages  # the other ranks' layers are dropped unread
    model.model.norm = FromLastRank(model.model.norm, group)


# --- experts: 1/N of every expert's intermediate rows per rank ---


class SummedOverRanks(nn.Module):
    """A feed-forward block computing this rank's share; an all_sum adds the others'."""

    def __init__(self, block: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.block, self.group = block, group

    def __call__(self, x: mx.array) -> mx.array:
        return all_sum(self.block(x), self.group)


def _shard_experts(model: Model, group: mx.distributed.Group) -> None:
    for layer in model.layers:
        swiglu = layer.mlp.switch_mlp if isinstance(layer.mlp, SparseMoeBlock) else layer.mlp
        assert isinstance(swiglu, (MLP, ExpertsSwiGLU))
        _keep_share(swiglu, group.rank(), group.size())
        layer.mlp = SummedOverRanks(layer.mlp, group)


def _keep_share(block: nn.Module, rank: int, size: int) -> None:
    """Keep rows [a, b) of the intermediate dimension: of gate and up (output rows), of down (input columns)."""
    intermediate = _input_width(block.down_proj)
    unit = getattr(block.down_proj, "group_size", 1)  # a quantized share holds whole groups
    units = intermediate // unit
    if units < size:
        raise QwenMLXError(f"--parallel experts: the intermediate size {intermediate} cannot be split over "
                           f"{size} ranks in whole quantization groups of {unit}")
    a, b = units * rank // size * unit, units * (rank + 1) // size * unit
    if "gate_up_proj" in block:
        gate_share, up_share = slice(a, b), slice(intermediate + a, intermediate + b)
        _take(block.gate_up_proj, lambda w: mx.concatenate([w[..., gate_share, :], w[..., up_share, :]], axis=-2))
    else:
        _take(block.gate_proj, lambda w: w[..., a:b, :])
        _take(block.up_proj, lambda w: w[..., a:b, :])
    _take_columns(block.down_proj, a, b)


def _input_width(layer: nn.Module) -> int:
    """Input features of a (quantized) linear or expert layer."""
    if "scales" in layer:
        return layer["scales"].shape[-1] * layer.group_size
    return layer["weight"].shape[-1]


def _take(layer: nn.Module, rows) -> None:
    """Replace the layer's weights by rows(weights), copied so the rest is freed (a slice would keep it alive)."""
    for name in ("weight", "scales", "biases"):
        if layer.get(name) is not None:
            layer[name] = mx.contiguous(rows(layer[name]))


def _take_columns(layer: nn.Module, a: int, b: int) -> None:
    """Keep input features [a, b) (packed quantized weights: the words holding them, and their groups)."""
    if "scales" not in layer:
        layer["weight"] = mx.contiguous(layer["weight"][..., a:b])
        return
    layer["weight"] = mx.contiguous(layer["weight"][..., a * layer.bits // 32 : b * layer.bits // 32])
    for name in ("scales", "biases"):
        if layer.get(name) is not None:
            layer[name] = mx.contiguous(layer[name][..., a // layer.group_size : b // layer.group_size])

