"""Finding a checkpoint (local dir or Hugging Face Hub id) and reading its weights into a Model.

Reads Hugging Face checkpoints (per-expert tensors, bf16/fp16/fp32, sharded with an index),
this project's converted dirs and mlx-lm's (stacked experts, optionally quantized). Weights are
read lazily from the safetensors files: nothing is materialised until the final eval, and
then in the compute dtype.
"""

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .attention import check_past_window
from .config import ModelConfig, read_config, with_qwen_dual_chunk
from .cpu_streams import Cores
from .errors import QwenMLXError
from .experts import DEFAULT_POLICY, ExpertBudget, expert_budget, parse_budget, stream_experts
from .model import Model
from .tokenizer import Tokenizer

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.tiktoken", "*.txt"]
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def resolve_model_dir(path_or_hub_id: str | Path) -> Path:
    """A local directory as is; otherwise a Hub id, from the local cache first and downloaded only if missing."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QwenMLXError(f"{path}: not a directory (a model is a directory with config.json and *.safetensors)")
        return path
    repo_id = str(path_or_hub_id)
    if repo_id.startswith((".", "~")) or path.is_absolute() or "\\" in repo_id:  # a path, never a Hub id
        raise QwenMLXError(f"{repo_id}: no such directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise QwenMLXError(f"{repo_id}: no such directory, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise QwenMLXError(
            f"{repo_id}: not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}); download it with `hf download {repo_id}` "
            "or pass a local directory"
        ) from None


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file, checked against the file's size (catches truncation)."""
    return safetensors_layout(path)[0]


def safetensors_layout(path: Path) -> tuple[dict, int]:
    """(the checked header, the byte offset in the file where the tensors' data begins)."""
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) < 8:
                raise QwenMLXError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", size_bytes)
            file_len = path.stat().st_size
            if header_len > file_len - 8:
                raise QwenMLXError(f"{path}: corrupted safetensors file (header length {header_len} exceeds the file)")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QwenMLXError(f"{path}: corrupted safetensors file (header is not valid JSON)") from None
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot read ({e.strerror})") from None
    data_len = file_len - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            n_bytes = SAFETENSORS_DTYPE_BYTES[info["dtype"]]
            n_elements = 1
            for d in info["shape"]:
                n_elements *= d
        except (KeyError, TypeError, ValueError):
            raise QwenMLXError(f"{path}: corrupted safetensors header (entry {name!r})") from None
        if end > data_len or end - begin != n_elements * n_bytes:
            raise QwenMLXError(f"{path}: truncated or corrupted safetensors file (tensor {name!r} runs past the data)")
    return header, 8 + header_len


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie: enough to read it alone, at its offset, without loading its file."""

    file: Path
    offset: int  # from the start of the file
    nbytes: int
    dtype: str  # safetensors' name
    shape: tuple[int, ...]

    def split(self, n: int) -> list["TensorLocation"]:
        """The n equal pieces along the first axis (the experts of a stacked tensor)."""
        size = self.nbytes // n
        return [TensorLocation(self.file, self.offset + i * size, size, self.dtype, self.shape[1:]) for i in range(n)]

    def bytes_in_memory(self, dtype: mx.Dtype) -> int:
        """Its size once loaded to compute in dtype: floating tensors in dtype, packed ones as stored."""
        if self.dtype in FLOAT_DTYPES:
            return math.prod(self.shape) * dtype.size
        return self.nbytes


def tensor_index(model_dir: Path) -> dict[str, TensorLocation]:
    """Every tensor of the checkpoint by name, with where its bytes are (from the safetensors headers)."""
    index = {}
    for path in weight_files(model_dir):
        header, data_start = safetensors_layout(path)
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                index[name] = TensorLocation(path, data_start + begin, end - begin, info["dtype"], tuple(info["shape"]))
    return index


def weights_in_memory(model_dir: Path, dtype: mx.Dtype) -> int:
    """Bytes the checkpoint's weights take once loaded to compute in dtype."""
    config = read_config(model_dir)
    return sum(t.bytes_in_memory(dtype) for name, t in tensor_index(model_dir).items() if not is_dropped(name, config))


def weight_files(model_dir: Path) -> list[Path]:
    """The shards the index names (each must exist), or every *.safetensors when there is no index."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise QwenMLXError(f"{index_path}: not a valid safetensors index (no weight_map)") from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise QwenMLXError(f"{f}: shard named in {index_path.name} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QwenMLXError(f"{model_dir}: no *.safetensors weight files")
    return files


FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 16, 4096


def model_fingerprint(model_dir: str | Path) -> str:
    """Which checkpoint a directory holds, as a hex string, from 64 KiB per weight file rather than all of it.

    Hashes config.json, each weight file's safetensors header and a few evenly spaced samples of its
    bytes (checkpoints of one architecture, a fine-tune and its base, share every header). The same
    checkpoint gives the same fingerprint wherever it is stored, so a saved KV cache can name its model.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    try:
        digest.update((model_dir / "config.json").read_bytes())
        for f in weight_files(model_dir):
            digest.update(f.name.encode())
            digest.update(json.dumps(safetensors_header(f), sort_keys=True).encode())
            digest.update(spread_samples(f, FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES))
    except OSError as e:
        raise QwenMLXError(f"{e.filename}: cannot read ({e.strerror})") from None
    return digest.hexdigest()


def spread_samples(path: Path, count: int, size: int) -> bytes:
    """count pieces of size bytes, evenly spaced from the start to the end of the file (all of it if smaller)."""
    length = path.stat().st_size
    with open(path, "rb") as f:
        if length <= count * size:
            return f.read()
        stride = (length - size) // (count - 1)
        pieces = []
        for i in range(count):
            f.seek(i * stride)
            pieces.append(f.read(size))
    return b"".join(pieces)


def read_weights(model_dir: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint, lazily (mx.load maps the files; data is read on eval)."""
    weights = {}
    for f in weight_files(model_dir):
        safetensors_header(f)
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise QwenMLXError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def is_dropped(name: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that the model does not use: RoPE tables, a tied lm_head."""
    return "rotary_emb.inv_freq" in name or (config.tie_word_embeddings and name == "lm_head.weight")


def expert_stacks(names, config: ModelConfig) -> dict[str, list[str]]:
    """{stacked MLX name: the per-expert Hugging Face names it is made of, in expert order}."""
    names = set(names)
    stacks = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        if f"{prefix}.experts.0.gate_proj.weight" not in names:
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts = [f"{prefix}.experts.{e}.{proj}.weight" for e in range(config.num_experts)]
            missing = [n for n in parts if n not in names]
            if missing:
                raise QwenMLXError(f"checkpoint is missing tensor {missing[0]}")
            stacks[f"{prefix}.switch_mlp.{proj}.weight"] = parts
    return stacks


def to_mlx_layout(weights: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
    """Hugging Face names -> ours (mlx-lm's): experts stacked per layer, tied or unused tensors dropped."""
    out = {k: v for k, v in weights.items() if not is_dropped(k, config)}
    for stacked, parts in expert_stacks(out, config).items():
        out[stacked] = mx.stack([out.pop(n) for n in parts])
    return out


def quantize_like_checkpoint(model: Model, config: ModelConfig, weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers wherever the checkpoint stores scales, with the config's bits and mode."""
    quantization = config.quantization or {}
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    defaults.setdefault("mode", "affine")

    def params_for(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        if isinstance(override, dict):
            return override  # as mlx-lm: taken whole, so a missing mode means affine
        params = dict(defaults)
        if "bits" not in params or "group_size" not in params:
            raise QwenMLXError(f"config.json: quantized tensor {path} but no bits/group_size in 'quantization'")
        return params

    nn.quantize(model, class_predicate=params_for)


def compute_dtype() -> mx.Dtype:
    """float32 on the CPU (MLX emulates bf16 there, and its expert matmul takes float32 only); bf16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def memory_budget_parts(model_dir: str | Path, dtype: mx.Dtype | None = None) -> ExpertBudget:
    """How a memory budget for this checkpoint's weights divides (its minimum, the slots a budget gives)."""
    model_dir, dtype = Path(model_dir), dtype or compute_dtype()
    return expert_budget(tensor_index(model_dir), read_config(model_dir), weights_in_memory(model_dir, dtype), dtype)


def check_weights(model: Model, weights: dict[str, mx.array], model_dir: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise QwenMLXError(f"{model_dir}: checkpoint is missing tensor {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise QwenMLXError(f"{model_dir}: checkpoint has unexpected tensor {unexpected[0]} (does config.json match?)")
    for name, array in expected.items():
        if weights[name].shape != array.shape:
            raise QwenMLXError(
                f"{model_dir}: tensor {name} has shape {tuple(weights[name].shape)}, "
                f"config.json implies {tuple(array.shape)}"
            )


def load_model(
    path_or_hub_id: str | Path,
    *,
    rope_scaling: dict | None = None,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    threads: int | None = None,
    self_extend: dict | None = None,
    dual_chunk: bool = False,
    sparse_prefill: bool = False,
    memory_budget: int | None = None,
    expert_policy: str = DEFAULT_POLICY,
    read_ahead: bool = False,
    overlap_reads: bool = True,
) -> tuple[Model, Path]:
    """Build the model its config.json describes and fill it from the checkpoint's safetensors.

    threads: CPU cores the large matmuls are split over (default: all; ignored on a GPU).
    self_extend: {"group_size": G, "window": W} runs SelfExtend attention (attention.py).
    dual_chunk: Qwen's dual chunk attention on a 2507 model, as its config_1m.json would (attention.py).
    sparse_prefill: dual chunk attention's prefill follows the config's sparse_attention_config (MInference).
    memory_budget: bytes the weights may take; when they need more, the experts are streamed from the
    files through slots that fit it (experts.py), evicting by expert_policy (experts.POLICIES); read_ahead: also
    read the next layer's likely experts while a layer computes; overlap_reads: read a step's misses on
    reader threads while the experts found in slots are computed.
    """
    check_past_window(self_extend, dual_chunk)
    model_dir = resolve_model_dir(path_or_hub_id)
    config = read_config(model_dir)
    if rope_scaling is not None:
        config.rope_scaling = rope_scaling or None  # {} switches YaRN off
        if config.rope_scaling and config.dual_chunk_attention_config:
            raise QwenMLXError(f"{model_dir}: its config turns dual chunk attention on, which keeps every position "
                               "trained; YaRN cannot be added to it")
    if self_extend is not None and config.dual_chunk_attention_config:
        raise QwenMLXError(f"{model_dir}: its config turns dual chunk attention on; --self-extend cannot replace it")
    config.self_extend = self_extend
    if dual_chunk:
        with_qwen_dual_chunk(config, str(model_dir / "config.json"))
    if sparse_prefill and not config.dual_chunk_attention_config:
        raise QwenMLXError(f"{model_dir}: --sparse-prefill is part of dual chunk attention's prefill, which this "
                           "model's config does not turn on (Qwen's config_1m.json does)")
    config.sparse_prefill = sparse_prefill
    model = Model(config)
    weights = to_mlx_layout(read_weights(model_dir), config)
    if any(k.endswith(".scales") for k in weights):
        quantize_like_checkpoint(model, config, weights)
    check_weights(model, weights, model_dir)

    dtype = dtype or compute_dtype()
    if memory_budget is not None:
        streamed = stream_experts(model, tensor_index(model_dir), weights_in_memory(model_dir, dtype),
                                  memory_budget, dtype, expert_policy, read_ahead, overlap_reads)
        weights = {k: v for k, v in weights.items() if not k.startswith(streamed)}
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    del weights  # the model now holds the only references, so fusing frees each original once it is joined
    if not lazy:
        # A layer at a time: q|k|v and gate|up are joined at load, and only one layer's originals are in flight.
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    model.eval()
    model.use_cores(Cores.for_device(threads))
    model.fingerprint = model_fingerprint(model_dir)
    return model, model_dir


def load(path_or_hub_id: str | Path, *, rope_scaling: dict | None = None, dtype: mx.Dtype | None = None,
         threads: int | None = None, self_extend: dict | None = None, dual_chunk: bool = False,
         sparse_prefill: bool = False, memory_budget: int | str | None = None):
    """(model, tokenizer) from a local dir or a Hub id; rope_scaling overrides the config's (e.g. YaRN factor 4).

    self_extend: {"group_size": G, "window": W} reads ~G times past the trained window (attention.py);
    dual_chunk: dual chunk attention with Qwen's settings, to 1M tokens on a 2507 model;
    sparse_prefill: its prefill sparse, as the config's sparse_attention_config says (attention.SparsePrefill).
    memory_budget: bytes (or "10GB") the weights may take; the experts are streamed from disk to fit it.

    The tokenizer comes first: a broken tokenizer or chat template is reported before any weight is read.
    """
    model_dir = resolve_model_dir(path_or_hub_id)
    tokenizer = Tokenizer.from_dir(model_dir)
    budget = None if memory_budget is None else parse_budget(memory_budget)
    model, _ = load_model(model_dir, rope_scaling=rope_scaling, dtype=dtype, threads=threads, memory_budget=budget,
                          self_extend=self_extend, dual_chunk=dual_chunk, sparse_prefill=sparse_prefill)
    return model, tokenizer


def describe_model(path_or_hub_id: str | Path) -> dict:
    """Facts about a checkpoint read from its config and safetensors headers (no weights loaded)."""
    model_dir = resolve_model_dir(path_or_hub_id)
    c = read_config(model_dir)
    n_params = n_bytes = 0
    for f in weight_files(model_dir):
        for name, info in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            n_bytes += count * SAFETENSORS_DTYPE_BYTES[info["dtype"]]
            n_params += count
    q = c.quantization
    return {
        "path": str(model_dir),
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "attention": f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads, head_dim {c.head_dim}",
        "experts": f"{c.num_experts}, {c.num_experts_per_tok} per token" if c.num_experts else "dense",
        "context": c.max_position_embeddings,
        "rope_scaling": c.rope_scaling,
        "dual_chunk_attention": c.dual_chunk_attention_config,
        "quantization": {k: q[k] for k in ("bits", "group_size", "mode") if k in q} if q else None,
        "size_on_disk_gb": round(n_bytes / 1e9, 3),
        "stored_elements": n_params,
    }
