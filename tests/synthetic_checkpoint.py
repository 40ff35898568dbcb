"""A Qwen3-MoE checkpoint in Hugging Face's layout whose bf16 weights are generated as they are read.

Every tensor is cut into blocks of BLOCK_ELEMENTS, and each block is drawn from its own PCG64 stream seeded
by the tensor's name and the block's index, so any byte range of any shard can be produced alone, in any
order, always the same. That lets tests/mock_hub.py serve Qwen3-30B-A3B's 61 GB without writing them.

The values stay in a sane range at any depth: matrices are ±[2^e, 2^(e+1)) with 2^e about 1/sqrt(fan-in)
(random sign and mantissa, so each layer keeps its input's scale), norms are in [1, 2).
"""

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenmlx.bench import hf_tensor_shapes
from tests.mock_hub import CHUNK_BYTES, BytesFile, DiskFile, Repo

BLOCK_ELEMENTS = CHUNK_BYTES // 2  # bf16


def tensor_block(name: str, shape: tuple[int, ...], block: int) -> np.ndarray:
    """Block `block` of the tensor's bf16 values, as uint16 bits."""
    count = min(BLOCK_ELEMENTS, math.prod(shape) - block * BLOCK_ELEMENTS)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    bits = np.random.PCG64([seed, block]).random_raw(-(-count // 4)).view(np.uint16)[:count]
    if len(shape) == 1:
        return (bits & 0x007F) | 0x3F80  # [1, 2): exponent 127, random mantissa
    exponent = 127 + math.floor(-0.5 * math.log2(shape[-1]))
    return (bits & 0x807F) | (exponent << 7)  # random sign and mantissa


@dataclass
class SyntheticShard:
    """One safetensors file: the header, then each tensor's bytes, made on demand."""

    shapes: dict[str, tuple[int, ...]]  # in file order

    def __post_init__(self):
        header, offset = {}, 0
        for name, shape in self.shapes.items():
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * math.prod(shape)]}
            offset += 2 * math.prod(shape)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.header = struct.pack("<Q", len(blob)) + blob
        self.offsets = {name: len(self.header) + info["data_offsets"][0] for name, info in header.items()}
        self.size = len(self.header) + offset
        self.etag = hashlib.sha1(self.header).hexdigest()

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        if start < len(self.header):
            yield self.header[start:min(end, len(self.header))]
        for name, shape in self.shapes.items():
            first, last = self.offsets[name], self.offsets[name] + 2 * math.prod(shape)
            if last <= start or first >= end:
                continue
            lo, hi = max(start, first) - first, min(end, last) - first  # bytes within the tensor
            for block in range(lo // CHUNK_BYTES, (hi - 1) // CHUNK_BYTES + 1):
                data = tensor_block(name, shape, block).tobytes()
                base = block * CHUNK_BYTES
                yield data[max(lo - base, 0):hi - base]


def synthetic_repo(config: dict, shard_bytes: int, side_files: list[Path] = ()) -> Repo:
    """The checkpoint as the Hub has Qwen's: shards filled in the model's order up to shard_bytes, an index,
    config.json, and the side files (tokenizer, generation config) as they are."""
    shards, size = [{}], 0
    for name, shape in hf_tensor_shapes(config).items():
        n_bytes = 2 * math.prod(shape)
        if shards[-1] and size + n_bytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n_bytes
    files, weight_map = {}, {}
    for i, shapes in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        files[name] = SyntheticShard(shapes)
        weight_map.update(dict.fromkeys(shapes, name))
    total = sum(2 * math.prod(shape) for shard in shards for shape in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    files["model.safetensors.index.json"] = BytesFile(json.dumps(index, indent=2).encode())
    files["config.json"] = BytesFile(json.dumps(config, indent=2).encode())
    files.update({path.name: DiskFile(path) for path in side_files})
    return Repo(files)
