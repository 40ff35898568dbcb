"""The experts of an MoE layer: all resident, or streamed from the safetensors files under a memory budget.

A decoded token uses top_k of num_experts experts per layer, so under a budget everything but the experts
stays in memory and the MoE layers keep a few experts in slots: one pool shared by all layers, or a quota
of each layer's own. When the router picks experts that are not in a slot, their rows are read from the
checkpoint at their byte offsets into slots (evicting the least recently or least often used), on reader
threads while the experts found in slots are computed, and the same gather matmul runs over the slot
array with the ids remapped to slots. Each (token, expert) row is the same dot product either way, so
the results are bitwise those of the fully loaded model. On request, the readers also read the next
layer's likely experts (its router applied to this layer's input) while this layer computes. Prefill
(many tokens touch most experts) streams the experts its chunk uses through once, in expert order, a
layer's quota at a time, without disturbing the slots.
"""

import copy
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelConfig
from .cpu_streams import NO_CORES
from .errors import QwenMLXError
from .fusion import concatenate_rows, fuse_gate_up, gate_and_up, swiglu

STREAM_THROUGH_MIN_PAIRS = 64  # from this many (token, expert) pairs, streamed experts are read through once (prefill)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
POLICIES = ("global-lru", "lru", "lfu")  # one pool of all layers' slots; a quota per layer
DEFAULT_POLICY = "lfu"  # read the least of the three in every budget bench run (README: Smaller than the weights)
READERS = 4  # threads reading experts at once (pread releases the GIL; an SSD serves several reads at a time)
MX_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "U8": mx.uint8,
             "I32": mx.int32}


class ExpertLinear(nn.Module):
    """All experts' weights stacked [experts, out, in]; each row of x is multiplied by its chosen experts only."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedExpertLinear":
        return QuantizedExpertLinear(self.weight, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    """ExpertLinear with quantized weights, read through gather_qmm (mlx-lm's on-disk names)."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
        )


class ExpertsSwiGLU(nn.Module):
    """The experts of one MoE layer: SwiGLU through gather matmuls, tokens sorted by expert for prefill."""

    cores = NO_CORES  # the (token, expert) pairs are split over its streams

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = ExpertLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = ExpertLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = ExpertLinear(intermediate_size, hidden_size, num_experts)

    @classmethod
    def holding(cls, projections: dict[str, nn.Module], cores) -> "ExpertsSwiGLU":
        """Experts computed from these projections (gate_up_proj or gate_proj and up_proj, and down_proj)."""
        experts = cls.__new__(cls)
        nn.Module.__init__(experts)
        for name, layer in projections.items():
            experts[name] = layer
        experts.cores = cores
        return experts

    def fuse(self) -> None:
        fuse_gate_up(self)

    def __call__(self, x: mx.array, expert_ids: mx.array) -> mx.array:
        """x: [..., hidden], expert_ids: [..., k] -> [..., k, hidden]."""
        k = expert_ids.shape[-1]
        # Several tokens (a prefill chunk, a batch of sequences decoding; as on main): group rows by expert so
        # each expert's weights are read once for all the tokens that chose it, as one larger matmul.
        if expert_ids.size > k:
            flat_ids = expert_ids.flatten()
            order = mx.argsort(flat_ids)
            rows = x.reshape(-1, 1, x.shape[-1])[order // k]
            ids = flat_ids[order]
            out = self.cores.blocks(ids.size, lambda a, b: self._swiglu(rows[a:b], ids[a:b], True), axis=0)
            return out[mx.argsort(order)].reshape(*expert_ids.shape, -1)
        rows = mx.expand_dims(x, (-2, -3))
        out = self.cores.blocks(k, lambda a, b: self._swiglu(rows, expert_ids[..., a:b], False), axis=-3)
        return out.squeeze(-2)

    def _swiglu(self, rows: mx.array, ids: mx.array, sorted_ids: bool) -> mx.array:
        hidden = swiglu(*gate_and_up(self, lambda layer: layer(rows, ids, sorted_ids)))
        return self.down_proj(hidden, ids, sorted_ids)


def make_experts(c: ModelConfig) -> ExpertsSwiGLU:
    """The resident experts of one MoE layer (stream_experts swaps in streamed ones after a budgeted load)."""
    return ExpertsSwiGLU(c.hidden_size, c.moe_intermediate_size, c.num_experts)


# --- streamed experts ---


def read_pieces(pieces: list) -> np.ndarray:
    """Equal-sized byte ranges (checkpoint.TensorLocation: one expert's part each) read at their offsets,
    one row each (pread releases the GIL, so a reader thread reads while MLX computes)."""
    buffer = np.empty((len(pieces), pieces[0].nbytes), np.uint8)
    for row, piece in zip(buffer, pieces):
        fd = os.open(piece.file, os.O_RDONLY)
        try:
            if os.preadv(fd, [row], piece.offset) != piece.nbytes:
                raise QwenMLXError(f"{piece.file}: truncated while reading an expert's weights")
        finally:
            os.close(fd)
    return buffer


@dataclass
class ExpertFiles:
    """Where each expert of one MoE layer lies: {projection: {array name: one location per expert}}."""

    locations: dict[str, dict[str, list]]
    templates: dict[str, nn.Module]  # each projection's layer (its class, bits, mode) without arrays
    dtype: mx.Dtype

    @property
    def expert_bytes(self) -> int:
        """One expert's size in memory (floating parts in the compute dtype)."""
        return sum(parts[0].bytes_in_memory(self.dtype) for arrays in self.locations.values()
                   for parts in arrays.values())

    @property
    def layout(self) -> tuple:
        """What decides the slot arrays' shapes and kinds: layers with equal layouts can share slots."""
        arrays = tuple((proj, name, parts[0].shape, parts[0].dtype) for proj, named in self.locations.items()
                       for name, parts in named.items())
        kinds = tuple((type(t).__name__, getattr(t, "bits", None), getattr(t, "group_size", None),
                       getattr(t, "mode", None)) for t in self.templates.values())
        return arrays, kinds

    def read(self, experts: list[int]) -> dict[str, nn.Module]:
        """These experts' projections stacked in this order, gate|up joined as a full load joins them."""
        return self.layers(self.read_bytes(experts))

    def read_bytes(self, experts: list[int]) -> dict[tuple[str, str], np.ndarray]:
        """{(projection, array name): the experts' bytes, a row each}."""
        return {(proj, name): read_pieces([parts[e] for e in experts])
                for proj, arrays in self.locations.items() for name, parts in arrays.items()}

    def layers(self, raw: dict[tuple[str, str], np.ndarray]) -> dict[str, nn.Module]:
        """Read bytes as projections, floating values cast to the compute dtype as a full load casts them."""
        layers = {proj: copy.copy(template) for proj, template in self.templates.items()}
        for (proj, name), rows in raw.items():
            piece = self.locations[proj][name][0]
            array = mx.array(rows).view(MX_DTYPES[piece.dtype]).reshape(len(rows), *piece.shape)
            layers[proj][name] = array.astype(self.dtype) if mx.issubdtype(array.dtype, mx.floating) else array
        fused = concatenate_rows([layers["gate_proj"], layers["up_proj"]])
        if fused is not None:
            return {"gate_up_proj": fused, "down_proj": layers["down_proj"]}
        return layers


def expert_files(index: dict, layer: int, experts: ExpertsSwiGLU, num_experts: int, dtype: mx.Dtype) -> ExpertFiles:
    """The layer's experts in the tensor index: stacked per projection (converted checkpoints: expert e is
    the e-th of num_experts equal pieces) or one tensor per expert (Hugging Face's layout)."""
    locations, templates = {}, {}
    for proj in PROJECTIONS:
        resident = experts[proj]
        templates[proj] = copy.copy(resident)
        arrays = {}
        for name in ("weight", "scales", "biases"):
            if resident.get(name) is None:
                continue
            del templates[proj][name]
            stacked = index.get(f"model.layers.{layer}.mlp.switch_mlp.{proj}.{name}")
            if stacked is not None:
                arrays[name] = stacked.split(num_experts)
            else:
                arrays[name] = [index[f"model.layers.{layer}.mlp.experts.{e}.{proj}.{name}"] for e in range(num_experts)]
            unreadable = {p.dtype for p in arrays[name]} - set(MX_DTYPES)
            if unreadable:
                raise QwenMLXError(f"{arrays[name][0].file}: experts stored as {unreadable.pop()} cannot be streamed; "
                                   "convert the checkpoint first (`qwenmlx convert`)")
        locations[proj] = arrays
    return ExpertFiles(locations, templates, dtype)


@dataclass
class SlotTable:
    """Which expert each slot holds, keyed (layer, expert), and which slot to give up next: the least
    recently used (lru) or the least often used, the least recent among equals (lfu)."""

    slots: int
    policy: str = "lru"
    held: list = field(default_factory=list)  # held[slot]: its (layer, expert), None while empty
    last_use: dict = field(default_factory=dict)
    uses: dict = field(default_factory=dict)
    clock: int = 0

    def __post_init__(self):
        self.held = [None] * self.slots

    def place(self, experts: list) -> tuple[dict, list[tuple]]:
        """({expert: slot} for these experts (at most `slots`), [(expert, slot) to read in]) after evicting."""
        self.clock += 1
        for e in experts:
            self.uses[e] = self.uses.get(e, 0) + 1
            self.last_use[e] = self.clock
        wanted = set(experts)
        slot_of = {e: s for s, e in enumerate(self.held) if e in wanted}
        missing = [e for e in experts if e not in slot_of]
        free = sorted((s for s, e in enumerate(self.held) if e not in slot_of), key=self._keep_score)
        reads = list(zip(missing, free))
        for e, s in reads:
            self.held[s] = e
            slot_of[e] = s
        return slot_of, reads

    def _keep_score(self, slot: int) -> tuple[int, ...]:
        expert = self.held[slot]
        if expert is None:
            return (-1, -1)
        if self.policy == "lfu":
            return (self.uses[expert], self.last_use[expert])
        return (self.last_use[expert],)


class SlotPool:
    """Expert slots: the table of what each holds, and the slot arrays (made at the first read). One pool
    per MoE layer (a quota each) or one shared by all the layers whose experts have the same layout."""

    def __init__(self, slots: int, policy: str):
        self.table = SlotTable(slots, policy)
        self.arrays: dict[str, nn.Module] | None = None

    def write(self, layers: dict[str, nn.Module], slots: list[int]) -> None:
        """Put these experts' projections (stacked in the order of `slots`) into those slots."""
        if self.arrays is None:
            self.arrays = {proj: self._empty(layer) for proj, layer in layers.items()}
        where = mx.array(slots)
        for proj, layer in layers.items():
            for name in ("weight", "scales", "biases"):
                if layer.get(name) is not None:
                    self.arrays[proj][name][where] = layer[name]
        mx.eval([layer.parameters() for layer in self.arrays.values()])

    def _empty(self, layer: nn.Module) -> nn.Module:
        empty = copy.copy(layer)
        for name in ("weight", "scales", "biases"):
            if layer.get(name) is not None:
                empty[name] = mx.zeros((self.table.slots, *layer[name].shape[1:]), layer[name].dtype)
        return empty


@dataclass
class StreamCounts:
    """What streaming did: expert lookups in decode that found a slot or read the file (misses), and bytes
    read; of the misses, those read ahead, and the experts read ahead that were not used."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_ahead_used: int = 0
    read_ahead_unused: int = 0

    def add(self, other: "StreamCounts") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class StreamedExperts(nn.Module):
    """One MoE layer's experts (the layer-th) in a pool's slots, `quota` of them its own or a share of a
    pool of all layers, read from the checkpoint's files on a miss.

    With a reader (threads), a decode step's misses are read all at once on it, and a single token's
    experts found in slots are computed meanwhile, its misses once they are in; without, the misses are
    read in turn before anything is computed. With read_ahead_for (the next MoE layer's router and
    experts), each decode step also guesses the next layer's experts by applying its router to this
    layer's input, and the reader reads the guessed misses while this layer computes.
    """

    cores = NO_CORES

    def __init__(self, files: ExpertFiles, pool: SlotPool, layer: int, quota: int,
                 reader: ThreadPoolExecutor | None = None):
        super().__init__()
        self._files, self._pool, self._layer, self._quota, self._reader = files, pool, layer, quota, reader
        self._next: tuple | None = None  # (router block, StreamedExperts, reader) of the next MoE layer
        self._ahead: dict[int, Future] = {}  # experts being read ahead: their bytes
        self.counts = StreamCounts()

    def read_ahead_for(self, router: nn.Module, experts: "StreamedExperts", reader: ThreadPoolExecutor) -> None:
        self._next = (router, experts, reader)

    def fuse(self) -> None:
        """Read experts come joined already (ExpertFiles.read)."""

    def __call__(self, x: mx.array, expert_ids: mx.array) -> mx.array:
        wanted = np.array(expert_ids)  # the router's choice decides what to read, so it is evaluated here
        experts = np.unique(wanted).tolist()
        if expert_ids.size >= STREAM_THROUGH_MIN_PAIRS or len(experts) > self._quota:
            return self._stream_through(x, wanted, experts)
        if self._next is not None:  # first, so the reader works while this layer reads and computes
            router, following, reader = self._next
            following.read_ahead(np.unique(np.array(router.route(x)[1])).tolist(), reader)
        placed, reads = self._pool.table.place([(self._layer, e) for e in experts])
        self.counts.hits += len(experts) - len(reads)
        self.counts.misses += len(reads)
        pending = [self._start_read(e) for (_, e), _ in reads]
        slot_ids = np.zeros(max(experts) + 1, np.uint32)
        slot_ids[experts] = [placed[self._layer, e] for e in experts]
        slot_ids = slot_ids[wanted]
        missed = np.isin(wanted, [e for (_, e), _ in reads])
        if self._reader is None or wanted.size > wanted.shape[-1] or missed.all() or not missed.any():
            self._write(pending, reads)
            return self._compute(x, slot_ids)
        # One token, some experts in slots: computed while its misses are read, the misses after.
        hits, misses = np.flatnonzero(~missed.reshape(-1)), np.flatnonzero(missed.reshape(-1))
        found = self._compute(x, slot_ids[..., hits])
        mx.async_eval(found)
        self._write(pending, reads, computing=found)
        out = mx.concatenate([found, self._compute(x, slot_ids[..., misses])], axis=-2)
        return out[..., mx.array(np.argsort(np.concatenate([hits, misses]))), :]

    def _compute(self, x: mx.array, slot_ids: np.ndarray) -> mx.array:
        return ExpertsSwiGLU.holding(self._pool.arrays, self.cores)(x, mx.array(slot_ids))

    def _stream_through(self, x: mx.array, wanted: np.ndarray, experts: list[int]) -> mx.array:
        """Many tokens (prefill): the experts they use read once, in expert order, `quota` at a time, each
        group's (token, expert) rows computed before the next group is read; the slots are left as they are.

        Each row is its own dot product whichever rows it is computed with, so grouping changes no bit.
        """
        k, hidden = wanted.shape[-1], x.shape[-1]
        rows, pairs = x.reshape(-1, hidden), wanted.reshape(-1)
        positions, outputs = [], []
        for start in range(0, len(experts), self._quota):
            group = experts[start : start + self._quota]
            here = np.flatnonzero(np.isin(pairs, group))
            layers = self._files.read(group)
            self.counts.bytes_read += len(group) * self._files.expert_bytes
            ids = np.searchsorted(np.array(group), pairs[here])[:, None].astype(np.uint32)
            out = ExpertsSwiGLU.holding(layers, self.cores)(rows[mx.array(here // k)], mx.array(ids))
            mx.eval(out)  # before the next group is read: one group's experts in memory at a time
            positions.append(here)
            outputs.append(out)
        order = np.argsort(np.concatenate(positions))
        return mx.concatenate(outputs)[mx.array(order)].reshape(*wanted.shape, hidden)

    def read_ahead(self, experts: list[int], reader: ThreadPoolExecutor) -> None:
        """Start reading these experts' bytes, those not in a slot, on the reader thread."""
        held = set(self._pool.table.held)
        for e in experts[: self._quota]:
            if (self._layer, e) not in held and e not in self._ahead:
                self._ahead[e] = reader.submit(self._files.read_bytes, [e])

    def _start_read(self, expert: int) -> Future:
        """Its bytes: being read ahead, or now on the reader, or read here and now without one."""
        if expert in self._ahead:
            self.counts.read_ahead_used += 1
            return self._ahead.pop(expert)
        if self._reader is not None:
            return self._reader.submit(self._files.read_bytes, [expert])
        done = Future()
        done.set_result(self._files.read_bytes([expert]))
        return done

    def _write(self, pending: list[Future], reads: list[tuple], computing: mx.array | None = None) -> None:
        """Once read, the misses into their slots (after `computing`, which uses the slots: the slot arrays
        are then updated in place rather than copied); guesses read ahead in vain dropped."""
        if pending:
            self.counts.bytes_read += len(pending) * self._files.expert_bytes
            read = [future.result() for future in pending]
            layers = self._files.layers({key: np.concatenate([r[key] for r in read]) for key in read[0]})
            if computing is not None:
                mx.eval(computing)
            self._pool.write(layers, [s for _, s in reads])
        for guess in self._ahead.values():
            if not guess.cancel():
                self.counts.read_ahead_unused += 1
                self.counts.bytes_read += self._files.expert_bytes
        self._ahead = {}


# --- the budget ---


SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_budget(value: int | str) -> int:
    """A memory budget in bytes from an int or a size like "10GB", "512MB", "12GiB"."""
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    try:
        n_bytes = int(float(number) * SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise QwenMLXError(f"memory budget {value!r}: not a size (examples: 10GB, 512MB, 12GiB)") from None
    if n_bytes <= 0:
        raise QwenMLXError(f"memory budget {value!r}: must be more than zero")
    return n_bytes


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3g} GB"


@dataclass(frozen=True)
class ExpertBudget:
    """How a budget for the weights divides: everything but the experts, then the slots, the same number in
    every MoE layer, and as many again for one layer's experts being read (prefill streams through them)."""

    resident_bytes: int
    expert_bytes: list[int]  # one expert of each MoE layer, in memory
    num_experts: int
    top_k: int

    @property
    def slot_bytes(self) -> int:
        """One slot in every MoE layer, and one more for the largest layer's experts being read."""
        return sum(self.expert_bytes) + max(self.expert_bytes, default=0)

    @property
    def minimum(self) -> int:
        """With top_k slots per MoE layer: one token's experts."""
        return self.resident_bytes + self.top_k * self.slot_bytes

    def slots(self, budget: int) -> int:
        """Slots per MoE layer within budget bytes (num_experts: all fit, nothing to stream)."""
        if budget >= self.resident_bytes + self.num_experts * sum(self.expert_bytes):
            return self.num_experts
        if not self.expert_bytes:
            raise QwenMLXError(f"memory budget {_gb(budget)} is below this model's weights, "
                               f"{_gb(self.resident_bytes)}, and it has no experts to stream")
        if budget < self.minimum:
            raise QwenMLXError(
                f"memory budget {_gb(budget)} is below this model's minimum of {_gb(self.minimum)} (weights other "
                f"than experts {_gb(self.resident_bytes)} + {self.top_k} experts per MoE layer and {self.top_k} "
                f"being read {_gb(self.top_k * self.slot_bytes)})")
        return min(self.num_experts, (budget - self.resident_bytes) // self.slot_bytes)


EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.mlp\.(?:experts\.\d+|switch_mlp)\.")


def expert_budget(index: dict, config: ModelConfig, weights_bytes: int, dtype: mx.Dtype) -> ExpertBudget:
    """The budget's parts from the tensor index: weights_bytes (the whole model in memory) less the experts."""
    per_layer = {}
    for name, location in index.items():
        match = EXPERT_TENSOR.match(name)
        if match and config.is_moe_layer(int(match[1])):
            per_layer[int(match[1])] = per_layer.get(int(match[1]), 0) + location.bytes_in_memory(dtype)
    experts = config.num_experts or 1
    return ExpertBudget(weights_bytes - sum(per_layer.values()), [b // experts for b in per_layer.values()],
                        config.num_experts or 0, config.num_experts_per_tok or 0)


def stream_experts(model: nn.Module, index: dict, weights_bytes: int, budget: int, dtype: mx.Dtype,
                   policy: str = DEFAULT_POLICY, read_ahead: bool = False, overlap: bool = True) -> tuple[str, ...]:
    """Give each MoE layer streamed experts whose slots fit `budget` bytes of weights in all (the whole model
    needs weights_bytes): as many slots per layer, in one pool shared by all (global-lru: the least recently
    used expert of any layer is evicted) or in a pool of each layer's own (lru, lfu), with read_ahead
    reading the next layer's guessed experts ahead and overlap reading a step's misses on READERS threads
    while what it found is computed; the weight names they read themselves, as prefixes (none when
    everything fits)."""
    if policy not in POLICIES:
        raise QwenMLXError(f"expert policy {policy!r}: must be one of {', '.join(POLICIES)}")
    c = model.config
    plan = expert_budget(index, c, weights_bytes, dtype)
    slots = plan.slots(budget)
    if slots >= plan.num_experts:
        return ()
    moe_layers = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    files = {i: expert_files(index, i, model.layers[i].mlp.switch_mlp, c.num_experts, dtype) for i in moe_layers}
    if policy == "global-lru":  # a pool per layout: every layer's, unless a recipe quantized some differently
        layouts = {}
        for i in moe_layers:
            layouts.setdefault(files[i].layout, []).append(i)
        sharing = list(layouts.values())
    else:
        sharing = [[i] for i in moe_layers]
    reader = ThreadPoolExecutor(READERS, thread_name_prefix="qwenmlx-expert-reader") if overlap or read_ahead else None
    for layers in sharing:
        pool = SlotPool(slots * len(layers), policy.removeprefix("global-"))
        for i in layers:
            model.layers[i].mlp.switch_mlp = StreamedExperts(files[i], pool, i, slots, reader if overlap else None)
    if read_ahead:
        for i, j in zip(moe_layers, moe_layers[1:]):
            model.layers[i].mlp.switch_mlp.read_ahead_for(model.layers[j].mlp, model.layers[j].mlp.switch_mlp, reader)
    return tuple(f"model.layers.{i}.mlp.switch_mlp." for i in moe_layers)


def stream_counts(model: nn.Module) -> StreamCounts:
    """The streamed layers' counts added up (all zero for resident experts)."""
    total = StreamCounts()
    for module in model.modules():
        if isinstance(module, StreamedExperts):
            total.add(module.counts)
    return total
