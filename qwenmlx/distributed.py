"""Several machines: one model split over the processes `mlx.launch` starts, through MLX's own mx.distributed.

Every rank runs the same command on the same inputs, in lockstep; each step's token is the one rank 0
sampled (an all_sum of 4 bytes), so all ranks go on alike. Rank 0 alone writes to the terminal, and in
chat reads it for all (SharedInput). `shard(model, group, mode)` splits the built model before its
weights are read:

- pipeline: consecutive layers per rank. Rank r receives the hidden state from rank r-1, runs its layers and
  sends the result to rank r+1; the last rank's output is summed over all ranks (the others add zeros), so
  every rank gets it. A rank reads only its own layers' weights. One hidden state crosses each link per step.
- experts: every rank holds 1/N of every expert (and of every dense MLP): its share of the intermediate rows,
  so each token's work splits evenly whichever experts the router picks (whole experts per rank would leave a
  rank idle when the top-k falls elsewhere). One all_sum per layer joins the shares; the router, attention
  and the KV cache are replicated.
"""

import hashlib
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import compute_dtype, load_model
from .config import ModelConfig
from .errors import QwenMLXError
from .experts import ExpertsSwiGLU
from .model import MLP, DecoderLayer, Model, SparseMoeBlock

MODES = ("pipeline", "experts")
TOKEN_BYTES = 4  # a sampled token id (uint32)


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

    def check_can_read_stdin(self, option: str) -> None:
        """mlx.launch hands its input to the ranks but never closes theirs: reading stdin to its end would hang."""
        if self.size > 1:
            raise QwenMLXError(f"{option}: under mlx.launch stdin never ends (mlx.launch keeps the ranks' input "
                               "open), so it cannot be read whole; pass the text or a file instead")


def join(mode: str = "pipeline") -> Ranks:
    """The ranks this process runs among (one when not started by mlx.launch). On several, the followers'
    stdout goes nowhere (rank 0 owns the terminal), and Ctrl-C ends every rank (exit code 130): it also stops
    mlx.launch, which then no longer hands on the terminal's input, so no rank could go on. The exit is
    immediate: Python's own would abort on chat's reading thread, still waiting on stdin (SharedInput)."""
    ranks = Ranks(mx.distributed.init(), check_mode(mode))
    if ranks.size > 1:
        signal.signal(signal.SIGINT, lambda *_: os._exit(128 + signal.SIGINT))
        if ranks.rank != 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
    return ranks


# MLX's ring backend waits for a peer by polling: a rank blocked in a collective keeps a core busy. Ranks that may
# wait long (for a person to type, for a request) meet at this interval instead, and sleep in between.
IDLE_TICK_SECONDS = 0.1
WAKE_EARLY_SECONDS = 0.003  # a waiting rank wakes this much before the next tick, so that rank 0 need not wait


def rest_until_next_tick() -> None:
    """A following rank, after rank 0's "nothing yet": sleep until just before rank 0's next word."""
    time.sleep(IDLE_TICK_SECONDS - WAKE_EARLY_SECONDS)


class SharedInput:
    """What rank 0 reads from its terminal (a line, or the end of input), handed to every rank.

    Rank 0 reads through `reader` (anything with line() and block()) in a thread of its own, and while the
    person has not answered it tells the others so at every tick: they sleep rather than poll for minutes.
    """

    LINE, END, WAITING = 0, 1, 2

    def __init__(self, reader, ranks: Ranks):
        self.reader, self.ranks = reader, ranks

    def line(self, continued: bool = False) -> str:
        return self._shared(lambda: self.reader.line(continued))

    def block(self) -> str:
        return self._shared(self.reader.block)

    def _shared(self, read) -> str:
        if self.ranks.rank == 0:
            reading = Reading(read)
            while not reading.done.wait(IDLE_TICK_SECONDS):
                broadcast_text(self.WAITING, "", self.ranks.group)
            broadcast_text(self.LINE if reading.raised is None else self.END, reading.text, self.ranks.group)
            if reading.raised is not None:
                raise reading.raised
            return reading.text
        while (shared := broadcast_text(self.LINE, "", self.ranks.group))[0] == self.WAITING:
            rest_until_next_tick()
        event, text = shared
        if event == self.END:
            raise EOFError
        return text


class Reading(threading.Thread):
    """One read() in a thread of its own (a daemon: it never keeps the process alive)."""

    def __init__(self, read):
        super().__init__(daemon=True)
        self.read, self.text, self.raised, self.done = read, "", None, threading.Event()
        self.start()

    def run(self) -> None:
        try:
            self.text = self.read()
        except BaseException as e:  # handed to the thread that waits for it
            self.raised = e
        self.done.set()


def broadcast_text(event: int, text: str, group: mx.distributed.Group) -> tuple[int, str]:
    """Rank 0's (event, text) on every rank (the others' arguments are ignored): two all_sums, the others adding 0."""
    data = text.encode() if group.rank() == 0 else b""
    header = mx.array([event, len(data)] if group.rank() == 0 else [0, 0], dtype=mx.int32)
    event, length = all_sum(header, group).tolist()
    if length == 0:
        return event, ""
    body = mx.array(memoryview(data)) if group.rank() == 0 else mx.zeros(length, dtype=mx.uint8)
    return event, bytes(all_sum(body, group)).decode()


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def setup_fingerprint(model_dir: Path, model_fingerprint: str) -> str:
    """The checkpoint's fingerprint with the tokenizer's files: every rank tokenizes the prompt itself."""
    digest = hashlib.sha256(model_fingerprint.encode())
    for name in TOKENIZER_FILES:
        path = model_dir / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"-"))
    return digest.hexdigest()


def check_same_model(fingerprint: str, group: mx.distributed.Group) -> None:
    """Every rank must load the same checkpoint and tokenizer: compare fingerprints before any weight is read."""
    mine = mx.array(list(bytes.fromhex(fingerprint)), dtype=mx.int32)
    every = mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu).tolist()
    differing = [r for r, theirs in enumerate(every) if theirs != every[0]]
    if differing:
        raise QwenMLXError(f"rank {differing[0]} has a different model from rank 0's (config, weights or "
                           "tokenizer differ): every rank needs the same checkpoint")


def layer_ranges(n_layers: int, size: int) -> list[range]:
    """Consecutive layers per rank, as even as can be; the first ranks take the extra layers."""
    if n_layers < size:
        raise QwenMLXError(f"--parallel pipeline: {n_layers} layers cannot be split over {size} ranks "
                           "(use --parallel experts or fewer ranks)")
    base, extra = divmod(n_layers, size)
    counts = [base + (r < extra) for r in range(size)]
    starts = [sum(counts[:r]) for r in range(size)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


def bytes_sent_per_token(config: ModelConfig, mode: str, size: int, dtype_bytes: int) -> int:
    """Bytes all ranks together send per decoded token, from the plan (a ring all_sum of an array of B bytes
    sends 2(size-1)/size * B from each rank; scripts/bench_distributed.py measures the sockets against it).

    pipeline: the hidden state over each of the size-1 links, then the all_sum handing the last rank's output
    to all; experts: one all_sum of the hidden state per layer. Both: rank 0's sampled token (4 bytes) to all.
    """
    if size == 1:
        return 0
    hidden = config.hidden_size * dtype_bytes
    token = 2 * (size - 1) * TOKEN_BYTES
    all_sum_bytes = 2 * (size - 1) * hidden
    if check_mode(mode) == "pipeline":
        return (size - 1) * hidden + all_sum_bytes + token
    return config.num_hidden_layers * all_sum_bytes + token


def messages_per_token(config: ModelConfig, mode: str, size: int) -> int:
    """Network hops one decoded token waits for one after another (each costs the link's latency once)."""
    if size == 1:
        return 0
    all_sum_steps = 2 * (size - 1)  # a ring all_sum: size-1 steps to reduce, size-1 to share
    if check_mode(mode) == "pipeline":
        return (size - 1) + all_sum_steps + all_sum_steps
    return (config.num_hidden_layers + 1) * all_sum_steps


def shard(model: Model, group: mx.distributed.Group, mode: str) -> Model:
    """Split a model built lazily (load_model(lazy=True)) over the group, before any weight is read."""
    if group.size() == 1:
        return model
    if check_mode(mode) == "pipeline":
        _shard_layers(model, group)
    else:
        _shard_experts(model, group)
    return model


@dataclass(frozen=True)
class Split:
    """How a model is split over the ranks, and what that costs per token (chat's /stats shows it)."""

    group: mx.distributed.Group
    mode: str
    collectives_per_token: int  # sends and all_sums one token waits for, one after another
    bytes_per_token: int  # sent by all ranks together
    seconds_per_collective: float  # one all_sum of one token's hidden state, timed after loading

    @property
    def size(self) -> int:
        return self.group.size()

    def communication_seconds(self, tokens: int) -> float:
        """Time `tokens` forwarded tokens spent communicating, estimated (MLX does not time its collectives)."""
        return tokens * self.collectives_per_token * self.seconds_per_collective

    def least(self, value: int) -> int:
        """The smallest of every rank's value (each rank passes its own; all get the same answer)."""
        return min(self._every(value))

    def most(self, value: int) -> int:
        return max(self._every(value))

    def _every(self, value: int) -> list[int]:
        mine = mx.array([value], dtype=mx.int64)
        return mx.distributed.all_gather(mine, group=self.group, stream=mx.cpu).tolist()

    def rank_0_samples(self, sample):
        """sample(logits, counts) whose token is rank 0's on every rank, so all go on with the same token even
        where another machine's arithmetic would tip a near tie the other way."""

        def rank_0s(logits: mx.array, counts: mx.array) -> mx.array:
            token = sample(logits, counts)
            if self.group.rank() != 0:  # zeros to add, once this rank's collectives of the step are done
                token = mx.depends(mx.zeros_like(token), token)
            return all_sum(token, self.group)

        return rank_0s


def load_sharded(model_dir: Path, ranks: Ranks, *, threads: int | None = None,
                 rope_scaling: dict | None = None, **attention) -> Model:
    """This rank's part of the model: built lazily, checked against the other ranks, split, then read.

    attention: load_model's self_extend, dual_chunk, sparse_prefill (each layer's attention is whole on its rank).
    """
    model, _ = load_model(model_dir, lazy=True, threads=threads, rope_scaling=rope_scaling, **attention)
    check_same_model(setup_fingerprint(model_dir, model.fingerprint), ranks.group)
    shard(model, ranks.group, ranks.mode)
    for layer in model.layers:  # a layer at a time, as load_model does
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    all_sum(mx.array(1.0), ranks.group).item()  # every rank loaded before any starts work
    config, dtype = model.config, compute_dtype()
    # pipeline: the sends from stage to stage, the final all_sum; experts: one all_sum per layer; and the token.
    collectives = (ranks.size if ranks.mode == "pipeline" else config.num_hidden_layers) + 1
    model.split = Split(ranks.group, ranks.mode, collectives,
                        bytes_sent_per_token(config, ranks.mode, ranks.size, dtype.size),
                        time_all_sum(mx.zeros((1, 1, config.hidden_size), dtype), ranks.group))
    return model


def time_all_sum(x: mx.array, group: mx.distributed.Group, repeats: int = 21) -> float:
    """Seconds one all_sum of x takes over the group: the median of `repeats`, after one to warm up."""
    mx.eval(all_sum(x, group))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(all_sum(x, group))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# --- pipeline: consecutive layers per rank ---


class PipelineStage(DecoderLayer):
    """A decoder layer of this rank's; the first receives its input from the previous rank, the last sends on.

    Still a DecoderLayer (its attention and MLP where they were), so what reaches into the layers
    (YaRN switched on or off, make_cache) works on a pipeline stage unchanged.
    """

    group: mx.distributed.Group
    receive_from: int | None
    send_to: int | None

    @classmethod
    def of(cls, layer: DecoderLayer, group: mx.distributed.Group, receive_from: int | None,
           send_to: int | None) -> "PipelineStage":
        layer.__class__ = cls
        layer.group, layer.receive_from, layer.send_to = group, receive_from, send_to
        return layer

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        if self.receive_from is not None:
            x = mx.distributed.recv_like(x, self.receive_from, group=self.group, stream=mx.cpu)
        h = super().__call__(x, cache)
        if self.send_to is not None:
            h = mx.distributed.send(h, self.send_to, group=self.group, stream=mx.cpu)
            if getattr(cache, "buffers", None) is not None:  # not a batch's cache: decode's logits need the send
                # Prefill evaluates only the caches: tie the send to them so the next rank is not left waiting.
                cache.buffers = mx.depends(cache.buffers, [h])
        return h


class FromLastRank(nn.RMSNorm):
    """The final norm, applied to the last rank's hidden state, which an all_sum hands to every rank.

    Still an RMSNorm with its weight where it was (the summariser reads its dtype).
    """

    group: mx.distributed.Group

    @classmethod
    def of(cls, norm: nn.RMSNorm, group: mx.distributed.Group) -> "FromLastRank":
        norm.__class__ = cls
        norm.group = group
        return norm

    def __call__(self, h: mx.array) -> mx.array:
        if self.group.rank() != self.group.size() - 1:
            h = mx.depends(mx.zeros_like(h), h)  # zeros to add, once this rank's part (its send) is done
        return super().__call__(all_sum(h, self.group))


def _shard_layers(model: Model, group: mx.distributed.Group) -> None:
    rank, size = group.rank(), group.size()
    mine = layer_ranges(len(model.layers), size)[rank]
    stages = []
    for i in mine:
        receive_from = rank - 1 if i == mine.start and rank > 0 else None
        send_to = rank + 1 if i == mine.stop - 1 and rank < size - 1 else None
        stages.append(PipelineStage.of(model.layers[i], group, receive_from, send_to))
    model.model.layers = stages  # the other ranks' layers are dropped unread
    model.model.norm = FromLastRank.of(model.model.norm, group)


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

