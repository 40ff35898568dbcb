"""Hugging Face (or unquantized MLX) checkpoint -> MLX model dir, streamed a block of rows at a time.

Every output tensor's shape and dtype follow from the source's safetensors headers and the
recipe, so the whole output (shards, their headers, every tensor's offset) is planned before a
single weight is read. Each shard file is then created with its header first, and each weight is
read, converted and written one block of rows at a time: one expert, or a slice of at most
BLOCK_BYTES of a larger matrix. Quantization works row by row, so the blocks give exactly the
bytes that quantizing the whole tensor gives, and memory stays at a few blocks whatever the model.

The output is what mlx-lm writes (stacked experts, its config.json `quantization` section), so
mlx_lm.load reads it too. It is written into a temporary sibling of DST and renamed at the end; what DST
may be, and what --force may replace, is decided by destinations.py.
"""

import json
import math
import os
import re
import shutil
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from quantize import QuantParams, Recipe, quantize, quantized_shapes, squared_error
from quantize import dequantize as dequantize_parts

from .cache import kv_cache_bytes, kv_elements_per_token
from .checkpoint import check_weights, expert_stacks, is_dropped, resolve_model_dir, safetensors_header, weight_files
from .config import ModelConfig, read_config
from .destinations import new_directory, prepare_directory
from .errors import QwenMLXError
from .model import Model

MAX_SHARD_BYTES = 5 * 10**9
BLOCK_BYTES = 64 << 20  # float32 bytes of one block of rows read, converted and written at once
# The fidelity report measures ‖W − Q(W)‖ on every 8th block of each weight (for experts: every 8th
# expert); measuring all would more than double the conversion time (MLX dequantizes slowly on the CPU).
ERROR_SAMPLE_EVERY = 8
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
# safetensors dtype -> numpy dtype of its raw bytes (bf16 is viewed as such in MLX, FP8 decoded by mx.from_fp8)
STORED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "U8": np.uint8,
                 "F8_E4M3": np.uint8}
SAFETENSORS_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8"}
OUTPUT_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}

Reader = Callable[[int, int], mx.array]  # (first row, row count) -> float [count, last dim]


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file; read a block of rows without touching the rest."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def row_length(self) -> int:
        return self.shape[-1] if self.shape else 1

    def read_rows(self, start: int, count: int) -> mx.array:
        """Rows [start, start + count) of the tensor seen as [rows, last dim]; FP8 comes back as raw uint8."""
        np_dtype = STORED_DTYPES[self.dtype]
        n = count * self.row_length
        offset = self.offset + start * self.row_length * np.dtype(np_dtype).itemsize
        try:
            data = np.fromfile(self.path, dtype=np_dtype, count=n, offset=offset)
        except OSError as e:
            raise QwenMLXError(f"{self.path}: cannot read tensor {self.name} ({e.strerror})") from None
        if data.size != n:
            raise QwenMLXError(f"{self.path}: truncated while reading tensor {self.name}")
        rows = mx.array(data.reshape(count, self.row_length))
        return rows.view(mx.bfloat16) if self.dtype == "BF16" else rows


def stored_tensors(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint with its file and offset, from the (validated) headers alone."""
    tensors = {}
    for path in weight_files(model_dir):
        header = safetensors_header(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in STORED_DTYPES:
                raise QwenMLXError(f"{path}: tensor {name} has dtype {info['dtype']}, which qwenmlx cannot convert")
            tensors[name] = StoredTensor(path, name, info["dtype"], tuple(info["shape"]),
                                         8 + header_len + info["data_offsets"][0])
    return tensors


@dataclass
class SourceWeight:
    """One tensor of the MLX model, in floating point, read as `parts` (one per stacked expert, else one)."""

    name: str
    shape: tuple[int, ...]
    parts: list[Reader]
    row_multiple: int = 1  # blocks start on multiples of this (FP8 scale blocks)
    files: frozenset[Path] = frozenset()  # the source files the parts read

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    def blocks(self) -> Iterator[tuple[int, int, Reader]]:
        """(first row, row count, read) covering all rows, each block at most about BLOCK_BYTES in float32."""
        part_rows = self.rows // len(self.parts)
        per_block = max(self.row_multiple, BLOCK_BYTES // (4 * self.shape[-1]) // self.row_multiple * self.row_multiple)
        for i, read in enumerate(self.parts):
            for start in range(0, part_rows, per_block):
                count = min(per_block, part_rows - start)
                yield i * part_rows + start, count, (lambda read=read, start=start, count=count: read(start, count))


def _plain_reader(t: StoredTensor) -> Reader:
    return t.read_rows


def _fp8_reader(t: StoredTensor, scale_inv: StoredTensor, block: tuple[int, int]) -> Reader:
    """Block-scaled FP8 (Qwen's -FP8 repos): e4m3 values times one scale per block_rows x block_cols tile."""
    block_rows, block_cols = block
    in_dims = t.shape[-1]

    def read(start: int, count: int) -> mx.array:
        values = mx.from_fp8(t.read_rows(start, count), dtype=mx.float32)
        first, last = start // block_rows, (start + count - 1) // block_rows + 1
        scales = scale_inv.read_rows(first, last - first).astype(mx.float32)
        scales = mx.repeat(mx.repeat(scales, block_rows, axis=0), block_cols, axis=1)
        offset = start - first * block_rows
        return values * scales[offset:offset + count, :in_dims]

    return read


def _dequantizing_reader(weight: StoredTensor, scales: StoredTensor, biases: StoredTensor | None,
                         params: QuantParams) -> Reader:
    def read(start: int, count: int) -> mx.array:
        parts = {"weight": weight.read_rows(start, count), "scales": scales.read_rows(start, count)}
        if biases is not None:
            parts["biases"] = biases.read_rows(start, count)
        return dequantize_parts(parts, params)

    return read


def _stored_quant_params(module: str, quantization: dict) -> QuantParams:
    override = quantization.get(module)
    params = dict(quantization, **override) if isinstance(override, dict) else quantization
    return QuantParams(params["bits"], params["group_size"], params.get("mode", "affine"))


def source_weights(tensors: dict[str, StoredTensor], config: ModelConfig, raw_config: dict,
                   dequantize: bool) -> list[SourceWeight]:
    """The model's tensors in MLX layout (experts stacked), each readable in blocks of float rows."""
    fp8 = raw_config.get("quantization_config") or {}
    fp8_block = tuple(fp8.get("weight_block_size", (128, 128))) if fp8.get("quant_method") == "fp8" else None
    quantized_modules = {n[: -len(".scales")] for n in tensors if n.endswith(".scales")}
    if quantized_modules and not dequantize:
        raise QwenMLXError(
            f"{next(iter(tensors.values())).path.parent}: already quantized; pass --dequantize to dequantize "
            "it first (the new quantization error adds to the old one)"
        )
    companions = {f"{m}.{s}" for m in quantized_modules for s in ("scales", "biases")}
    companions |= {n for n in tensors if n.endswith(".weight_scale_inv")}

    def reader(t: StoredTensor) -> tuple[Reader, tuple[int, ...], int, set[Path]]:
        module = t.name[: -len(".weight")]
        if module in quantized_modules and t.name.endswith(".weight"):
            params = _stored_quant_params(module, config.quantization or {})
            shape = (*t.shape[:-1], t.shape[-1] * 32 // params.bits)
            scales, biases = tensors[f"{module}.scales"], tensors.get(f"{module}.biases")
            files = {t.path, scales.path} | ({biases.path} if biases else set())
            return _dequantizing_reader(t, scales, biases, params), shape, 1, files
        if t.dtype == "F8_E4M3":
            scale_inv = tensors.get(f"{t.name}_scale_inv")
            if scale_inv is None or fp8_block is None:
                raise QwenMLXError(f"{t.path}: FP8 tensor {t.name} without a weight_scale_inv block scale "
                                   "(or config.json lacks quantization_config.quant_method \"fp8\")")
            return _fp8_reader(t, scale_inv, fp8_block), t.shape, fp8_block[0], {t.path, scale_inv.path}
        return _plain_reader(t), t.shape, 1, {t.path}

    stacks = expert_stacks(tensors, config)
    stacked_parts = {n for parts in stacks.values() for n in parts}
    weights = []
    for name, t in tensors.items():
        if name in companions or name in stacked_parts or is_dropped(name, config):
            continue
        read, shape, row_multiple, files = reader(t)
        weights.append(SourceWeight(name, shape, [read], row_multiple, frozenset(files)))
    for name, parts in stacks.items():
        readers = [reader(tensors[p]) for p in parts]
        shape = readers[0][1]
        weights.append(SourceWeight(name, (len(parts), *shape), [r for r, _, _, _ in readers], readers[0][2],
                                    frozenset().union(*(files for _, _, _, files in readers))))
    return in_source_order(weights)


def in_source_order(weights: list[SourceWeight]) -> list[SourceWeight]:
    """Grouped by the last source file each weight reads (files in name order), then by name.

    Each source file is then read by one run of consecutive weights (a stacked expert weight may span two
    files), so `qwenmlx pull` holds at most about two source files on disk at a time.
    """
    rank = {name: i for i, name in enumerate(sorted({f.name for w in weights for f in w.files}))}
    return sorted(weights, key=lambda w: (max((rank[f.name] for f in w.files), default=0), _natural_key(w.name)))


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def module_kind(name: str) -> str:
    """What a tensor is, whatever its layer: `model.layers.7.mlp.switch_mlp.up_proj.weight` -> `mlp.switch_mlp.up_proj`."""
    path = re.sub(r"^(model\.)?(layers\.\d+\.)?", "", name.rsplit(".", 1)[0])
    return "norms" if path.endswith("norm") else path


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, math.prod(self.shape[:-1]))


@dataclass
class Step:
    """One source weight and the tensor(s) it becomes: itself in the output dtype, or weight/scales[/biases]."""

    weight: SourceWeight
    params: QuantParams | None
    outputs: dict[str, OutputTensor]  # "" for an unquantized tensor, else "weight", "scales", "biases"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs.values())

    @property
    def module(self) -> str:
        return self.weight.name.rsplit(".", 1)[0]


def is_quantizable(weight: SourceWeight) -> bool:
    """Matrices of linear, expert and embedding layers; norms and biases stay as they are."""
    return weight.name.endswith(".weight") and len(weight.shape) >= 2


@dataclass
class ConversionPlan:
    """Everything about the output, decided before any weight is read."""

    src: Path
    raw_config: dict
    config: ModelConfig
    recipe: Recipe | None
    dtype: mx.Dtype
    steps: list[Step]
    shards: list[list[Step]]
    quantization: dict | None

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.steps)

    def shard_name(self, index: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"


def plan_conversion(src: str | Path, recipe: Recipe | None, dtype: mx.Dtype = mx.bfloat16, *,
                    dequantize: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                    tensors: dict[str, StoredTensor] | None = None) -> ConversionPlan:
    """Read the source's config and headers and decide every output tensor; errors surface here, before any work.

    tensors: where the weights lie when not in src's own files (`pull`: the shards it is about to download).
    """
    src = resolve_model_dir(src)
    config = read_config(src)
    raw_config = json.loads((src / "config.json").read_text())
    weights = source_weights(tensors or stored_tensors(src), config, raw_config, dequantize)
    check_weights(Model(config), {w.name: w for w in weights}, src)
    if recipe is not None:
        recipe.check_layers(config.num_hidden_layers)

    steps = []
    for w in weights:
        params = recipe.params_for(w.name[: -len(".weight")], config.num_hidden_layers) \
            if recipe is not None and is_quantizable(w) else None
        if params is None:
            outputs = {"": OutputTensor(w.name, w.shape, dtype)}
        else:
            module = w.name[: -len(".weight")]
            outputs = {suffix: OutputTensor(f"{module}.{suffix}", shape, part_dtype)
                       for suffix, (shape, part_dtype) in quantized_shapes(w.name, w.shape, params, dtype).items()}
        steps.append(Step(w, params, outputs))
    if recipe is not None and all(step.params is None for step in steps):
        raise QwenMLXError(f"recipe {recipe.name}: quantizes nothing in {src} (no rule gives bits to any of its "
                           "weights, and there is no [default])")

    shards: list[list[Step]] = []
    shard_bytes = 0
    for step in steps:
        if not shards or shard_bytes + step.nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(step)
        shard_bytes += step.nbytes
    return ConversionPlan(src, raw_config, config, recipe, dtype, steps, shards, quantization_section(steps))


def quantization_section(steps: list[Step]) -> dict | None:
    """mlx-lm's config entry: the params covering most weights, plus every module that differs (False: kept)."""
    counts = Counter()
    for step in steps:
        if step.params is not None:
            counts[step.params] += math.prod(step.weight.shape)
    if not counts:
        return None
    default = counts.most_common(1)[0][0]
    section = default.as_config()
    for step in steps:
        if not is_quantizable(step.weight) or step.params == default:
            continue
        section[step.module] = step.params.as_config() if step.params is not None else False
    return section


@dataclass
class KindSummary:
    kind: str
    elements: int = 0
    nbytes: int = 0
    quantization: set = field(default_factory=set)
    squared_error: float = 0.0
    squared_norm: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.elements

    @property
    def relative_error(self) -> float | None:
        """‖W − Q(W)‖ / ‖W‖ over the kind's tensors (sampled blocks); None when none of them is quantized."""
        if not self.squared_norm:
            return None
        return math.sqrt(self.squared_error / self.squared_norm)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "elements": self.elements, "bytes": self.nbytes,
                "bits_per_weight": round(self.bits_per_weight, 3),
                "quantization": ", ".join(sorted(self.quantization)),
                "relative_error": self.relative_error}


@dataclass
class ConversionReport:
    dst: Path | None
    recipe: str
    nbytes: int
    elements: int
    tensors: int
    shards: int
    seconds: float
    kinds: list[KindSummary]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.elements

    def as_dict(self) -> dict:
        return {"dst": str(self.dst) if self.dst else None, "recipe": self.recipe, "size_bytes": self.nbytes,
                "size_gb": round(self.nbytes / 1e9, 3), "bits_per_weight": round(self.bits_per_weight, 3),
                "tensors": self.tensors, "shards": self.shards, "seconds": round(self.seconds, 2),
                "kinds": [k.as_dict() for k in self.kinds]}


def describe_params(params: QuantParams | None) -> str:
    if params is None:
        return "unquantized"
    if params.mode == "affine":
        return f"{params.bits}-bit affine g{params.group_size}"
    return params.mode


def kind_summaries(steps: list[Step]) -> dict[str, KindSummary]:
    kinds = {}
    for step in steps:
        kind = module_kind(step.weight.name)
        summary = kinds.setdefault(kind, KindSummary(kind))
        summary.elements += math.prod(step.weight.shape)
        summary.nbytes += step.nbytes
        summary.quantization.add(describe_params(step.params))
    return kinds


def shard_header(steps: list[Step]) -> tuple[dict, bytes, int]:
    """A shard's header (every offset follows from the plan), its bytes as written, and the file's size."""
    header, offset = {}, 0
    for step in steps:
        for t in step.outputs.values():
            header[t.name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
    header["__metadata__"] = {"format": "mlx"}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    header_bytes = struct.pack("<Q", len(header_bytes)) + header_bytes
    return header, header_bytes, len(header_bytes) + offset


def _write_shard(path: Path, steps: list[Step], dtype: mx.Dtype, kinds: dict[str, KindSummary],
                 on_progress: Callable[[int], None]) -> None:
    """Header first (all offsets are known), then each block of rows at its place as it is computed."""
    header, header_bytes, size = shard_header(steps)
    data_start = len(header_bytes)

    with open(path, "wb") as f:
        f.write(header_bytes)
        f.truncate(size)
        for step in steps:
            kind = kinds[module_kind(step.weight.name)]
            for i, (first_row, _, read) in enumerate(step.weight.blocks()):
                w = read().astype(dtype)
                parts, errors = {"": w}, ()
                if step.params is not None:
                    parts = quantize(w, step.params)
                    if i % ERROR_SAMPLE_EVERY == 0:
                        errors = squared_error(w, parts, step.params)
                mx.eval(parts, errors)
                if errors:
                    kind.squared_error += errors[0].item()
                    kind.squared_norm += errors[1].item()
                for suffix, block in parts.items():
                    t = step.outputs[suffix]
                    f.seek(data_start + header[t.name]["data_offsets"][0] + first_row * t.row_bytes)
                    data = np.asarray(block.view(mx.uint16) if block.dtype == mx.bfloat16 else block)
                    f.write(data.tobytes())
                    on_progress(data.nbytes)
        f.flush()
        os.fsync(f.fileno())


def output_config(plan: ConversionPlan) -> dict:
    """The source's config.json with mlx-lm's quantization section (under both names it reads)."""
    config = {k: v for k, v in plan.raw_config.items() if k not in ("quantization", "quantization_config")}
    # The names older readers (mlx-lm) look for, where transformers >= 5 wrote newer ones.
    config.setdefault("rope_theta", plan.config.rope_theta)
    if plan.config.rope_scaling:
        config.setdefault("rope_scaling", plan.config.rope_scaling)
    if plan.config.num_experts:
        config.setdefault("num_experts", plan.config.num_experts)
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = {mx.bfloat16: "bfloat16", mx.float16: "float16"}[plan.dtype]
    if plan.quantization is not None:
        config["quantization"] = plan.quantization
        config["quantization_config"] = plan.quantization
    return dict(sorted(config.items()))


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, generation_config.json, chat template, license: everything that is not weights or config."""
    for path in sorted(src.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.suffix not in WEIGHT_SUFFIXES
                and path.name not in ("config.json", "model.safetensors.index.json")):
            shutil.copy(path, dst / path.name)


def check_disk_space(dst: Path, needed: int) -> None:
    parent = dst.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        digits = next(d for d in range(2, 10) if f"{needed / 1e9:.{d}f}" != f"{free / 1e9:.{d}f}")
        raise QwenMLXError(f"{parent}: not enough free disk space for {dst.name}: "
                           f"needs {needed / 1e9:.{digits}f} GB, {free / 1e9:.{digits}f} GB free")


def is_complete_shard(path: Path, steps: list[Step]) -> bool:
    """Whether path is the shard these steps make, whole: its size and header are the planned ones."""
    _, header_bytes, size = shard_header(steps)
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size == size and f.read(len(header_bytes)) == header_bytes
    except OSError:
        return False


def write_files(plan: ConversionPlan, out: Path, kinds: dict[str, KindSummary],
                on_progress: Callable[[int], None] = lambda n: None) -> dict[str, str]:
    """Every file of the model into the directory out; returns the weight map.

    Each shard is written under a temporary name and renamed when whole, so a shard under its own name
    is complete: one already in `out` (left by an interrupted `pull`) is kept, and counted as written.
    """
    weight_map = {}
    for i, steps in enumerate(plan.shards):
        path = out / plan.shard_name(i)
        if is_complete_shard(path, steps):
            on_progress(sum(step.nbytes for step in steps))
        else:
            partial = path.with_name(path.name + ".incomplete")
            _write_shard(partial, steps, plan.dtype, kinds, on_progress)
            partial.rename(path)
        weight_map.update({t.name: path.name for step in steps for t in step.outputs.values()})
    index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (out / "config.json").write_text(json.dumps(output_config(plan), indent=4))
    copy_side_files(plan.src, out)
    return weight_map


def write_model(plan: ConversionPlan, dst: str | Path, *, force: bool = False,
                on_progress: Callable[[int], None] = lambda n: None,
                on_note: Callable[[str], None] = lambda message: None) -> ConversionReport:
    """Write the planned model into dst atomically (temp sibling dir, renamed at the end) and report on it.

    dst is never the source, nor holds it, nor lies inside it; an existing one is replaced only with force,
    and only if qwenmlx wrote it (see destinations). on_note hears of dead runs' leftovers cleared beside it."""
    target = prepare_directory(dst, inputs={"source": plan.src}, force=force, on_note=on_note)
    check_disk_space(target, plan.total_bytes)
    start = time.perf_counter()
    kinds = kind_summaries(plan.steps)
    try:
        with new_directory(target) as tmp:
            weight_map = write_files(plan, tmp, kinds, on_progress)
    except OSError as e:
        raise QwenMLXError(f"{dst}: writing failed ({e.strerror or e}); nothing was left behind") from None
    return ConversionReport(Path(dst).expanduser(), plan.recipe.name if plan.recipe else "unquantized",
                            plan.total_bytes, sum(k.elements for k in kinds.values()), len(weight_map),
                            len(plan.shards), time.perf_counter() - start, list(kinds.values()))


def convert(src: str | Path, dst: str | Path, recipe: Recipe | None = None, *, dtype: mx.Dtype = mx.bfloat16,
            force: bool = False, dequantize: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
            on_progress: Callable[[int], None] = lambda n: None,
            on_note: Callable[[str], None] = lambda message: None) -> ConversionReport:
    """Convert (and quantize per `recipe`, or keep in `dtype`) a checkpoint into an MLX model dir."""
    plan = plan_conversion(src, recipe, dtype, dequantize=dequantize, max_shard_bytes=max_shard_bytes)
    return write_model(plan, dst, force=force, on_progress=on_progress, on_note=on_note)


def memory_plan(plan: ConversionPlan, context: int) -> dict:
    """What `--plan` prints: the size on disk and the memory to run it at a context length."""
    if context < 1:
        raise QwenMLXError(f"--context must be at least 1, got {context}")
    kinds = kind_summaries(plan.steps)
    elements = sum(k.elements for k in kinds.values())
    kv = kv_cache_bytes(kv_elements_per_token(plan.config), context)  # bf16, as on a Mac
    kv8 = kv_cache_bytes(kv_elements_per_token(plan.config), context, bits=8)
    return {
        "recipe": plan.recipe.name if plan.recipe else "unquantized",
        "size_on_disk_gb": round(plan.total_bytes / 1e9, 3),
        "bits_per_weight": round(8 * plan.total_bytes / elements, 3),
        "context": context,
        "kv_cache_gb": round(kv / 1e9, 3),
        "kv_cache_8bit_gb": round(kv8 / 1e9, 3),
        "memory_gb": round((plan.total_bytes + kv) / 1e9, 3),
        "memory_8bit_kv_gb": round((plan.total_bytes + kv8) / 1e9, 3),
        "shards": len(plan.shards),
        "kinds": [k.as_dict() for k in kinds.values()],
    }
