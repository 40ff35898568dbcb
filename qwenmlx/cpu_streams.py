"""Every CPU core at work: MLX's CPU backend runs each matmul on one thread, but each stream has a thread of its own.

On the CPU the large projections (q|k|v, o, the dense MLP, lm_head) are computed in blocks of output rows,
the experts' work in blocks of (token, expert) pairs and attention over the KV cache in groups of KV heads,
one block per stream, then joined. It is exact: every output is the same dot product either way. On a GPU
one kernel already fills the device, so nothing is split there and the graph stays what it is.
"""

import copy
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .errors import QwenMLXError


def cpu_threads() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(threads: int | None = None) -> tuple[int, str | None]:
    """The threads to run on (default: every core), and a note when more were asked for than there are cores.

    More streams than cores only take turns on the same cores, so the count is capped at the cores.
    """
    cores = cpu_threads()
    if threads is None:
        return cores, None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise QwenMLXError(f"--threads must be at least 1, got {threads}")
    if threads > cores:
        return cores, f"--threads {threads}: this machine gives qwenmlx {cores} cores, so it uses {cores}"
    return threads, None


@dataclass(frozen=True)
class Cores:
    """The streams work is spread over; none means one block, as on a GPU."""

    streams: tuple[mx.Stream, ...] = ()
    min_rows: int = 1024  # smaller projections (the router's 128 rows) cost less than splitting and joining

    @classmethod
    def for_device(cls, threads: int | None = None) -> "Cores":
        """One stream per thread (default: every core, at most every core) on the CPU; none on a GPU or for one."""
        threads, _ = thread_count(threads)
        if mx.default_device() != mx.cpu or threads == 1:
            return cls()
        return cls(cpu_streams(threads))

    def blocks(self, n: int, block: Callable[[int, int], mx.array], axis: int) -> mx.array:
        """block(start, stop) over contiguous blocks of range(n), each on its own stream, joined along axis."""
        k = min(len(self.streams), n)
        if k < 2:
            return block(0, n)
        cuts = [n * i // k for i in range(k + 1)]
        parts = []
        for stream, start, stop in zip(self.streams, cuts, cuts[1:]):
            with mx.stream(stream):
                parts.append(block(start, stop))
        return mx.concatenate(parts, axis=axis)

    def rows(self, layer: nn.Module, x: mx.array, method: str = "__call__") -> mx.array:
        """layer(x) (or another method computing x @ weight.T) in blocks of the layer's output rows."""
        n = layer["weight"].shape[-2]
        if n < self.min_rows or len(self.streams) < 2:  # nothing to split: no per-step copies and views to build
            return getattr(layer, method)(x)
        return self.blocks(n, lambda start, stop: getattr(output_rows(layer, start, stop), method)(x), axis=-1)


NO_CORES = Cores()


_this_thread = threading.local()


def cpu_streams(n: int) -> tuple[mx.Stream, ...]:
    """n CPU streams, made once per thread and shared by every model it loads (MLX streams belong to the
    thread that made them: a server loads and runs its model on its generation thread)."""
    made = _this_thread.__dict__.setdefault("cpu_streams", {})
    if n not in made:
        made[n] = tuple(mx.new_stream(mx.cpu) for _ in range(n))
    return made[n]


def output_rows(layer: nn.Module, start: int, stop: int) -> nn.Module:
    """The layer restricted to output rows start:stop (views of its weights, quantized or not)."""
    part = copy.copy(layer)
    for name in ("weight", "scales", "biases"):
        if layer.get(name) is not None:
            part[name] = layer[name][..., start:stop, :]
    if "bias" in layer:
        part["bias"] = layer["bias"][..., start:stop]
    return part
