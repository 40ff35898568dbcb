"""KV caches: what each attention layer keeps of past tokens, where those tokens sit, and how it attends over them.

Attention rotates the new queries and keys at positions offset, offset+1, ... and hands them over
with the layer's RoPE, which the rotating cache uses to move tokens to other positions. Keys are stored
after RoPE at their index (or, rotated_keys False, where an attention variant places them: attention.py),
contiguous from position 0, in one of two forms: float arrays, or 4/8-bit groups
(mx.quantize) read through mx.quantized_matmul. The rotating cache bounds the number of tokens by
evicting the oldest ones after the first `keep` (attention sinks) and re-rotating the keys it keeps
to contiguous positions, as llama.cpp's context shift does, so positions never exceed its size.
"""

import json
import math
import os
import tempfile
from pathlib import Path

import mlx.core as mx

from .checkpoint import safetensors_header
from .cpu_streams import NO_CORES, Cores
from .errors import QwenMLXError

SUPPORTED_KV_BITS = (4, 8)
CACHE_HEADER_KEY = "qwenmlx_caches"  # in a saved cache's safetensors metadata: each layer's describe()


class KVCache:
    """A growing cache, pre-allocated in steps so that decode does not reallocate every token."""

    step = 256
    max_size: int | None = None  # the growing cache is unbounded
    keep = evicted = 0  # the rotating cache's kept (sink) tokens and tokens dropped so far
    prompt_end = 0  # where the prompt being fed ends (set by generate); dual chunk attention scales by it

    def __init__(self, bits: int | None = None, group_size: int = 64, rotated_keys: bool = True):
        if bits is not None and bits not in SUPPORTED_KV_BITS:
            raise QwenMLXError(f"--kv-bits {bits}: supported KV cache bits are {SUPPORTED_KV_BITS}")
        self.bits, self.group_size, self.rotated_keys = bits, group_size, rotated_keys
        # Arrays with the token axis at 2: [keys, values], or quantized
        # [keys, key_scales, key_biases, values, value_scales, value_biases].
        self.buffers: list[mx.array] | None = None
        self.offset = 0  # tokens held; also the RoPE position of the next token

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, rope,
               cores: Cores = NO_CORES) -> mx.array:
        """Store the new tokens (q and k already rotated at positions offset...), attend causally over everything held.

        cores: streams over which groups of KV heads (with their query heads) are attended side by side.
        """
        self.store(keys, values)
        return self._attention(queries, scale, cores)

    def store(self, keys: mx.array, values: mx.array) -> None:
        """Append keys/values after what is held (no eviction: the caller keeps within max_size)."""
        L = keys.shape[2]
        self._reserve(self.offset + L, keys)
        self._write(self.offset, self._encode(keys) + self._encode(values))
        self.offset += L

    def trim(self, n: int) -> int:
        """Forget the last n tokens (prompt reuse); returns how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def state(self) -> list[mx.array]:
        """The arrays holding the cached tokens (what prefill evaluates, and what is saved)."""
        return [] if self.buffers is None else [b[..., : self.offset, :] for b in self.buffers]

    @property
    def nbytes(self) -> int:
        return 0 if self.buffers is None else sum(b.nbytes for b in self.buffers)

    # Storage: float or quantized, behind the same three operations.

    def _encode(self, x: mx.array) -> list[mx.array]:
        """Keys or values as stored: the array itself, or its (packed, scales, biases)."""
        return [x] if self.bits is None else list(mx.quantize(x, self.group_size, self.bits))

    def _decoded_keys(self, start: int, end: int) -> mx.array:
        return self._decoded(self.buffers[: len(self.buffers) // 2], start, end)

    def _decoded(self, parts: list[mx.array], start: int, end: int) -> mx.array:
        parts = [b[..., start:end, :] for b in parts]
        if self.bits is None:
            return parts[0]
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits)

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        """Every held key and value as floats (dequantized where stored in bits)."""
        half = len(self.buffers) // 2
        return self._decoded(self.buffers[:half], 0, self.offset), self._decoded(self.buffers[half:], 0, self.offset)

    def _reserve(self, n_tokens: int, like: mx.array) -> None:
        """Make room for n_tokens, growing in steps (never past max_size)."""
        capacity = 0 if self.buffers is None else self.buffers[0].shape[2]
        if n_tokens <= capacity:
            return
        new_capacity = -(-n_tokens // self.step) * self.step
        if self.max_size is not None:
            new_capacity = min(new_capacity, self.max_size)
        B, n_kv_heads, _, head_dim = like.shape
        shape = (B, n_kv_heads, new_capacity, head_dim)
        blank = self._encode(mx.zeros(shape, like.dtype)) + self._encode(mx.zeros(shape, like.dtype))
        if self.buffers is not None:
            for new, old in zip(blank, self.buffers):
                new[..., : self.offset, :] = old[..., : self.offset, :]
        self.buffers = blank

    def _write(self, start: int, parts: list[mx.array]) -> None:
        for buffer, part in zip(self.buffers, parts):
            buffer[..., start : start + part.shape[2], :] = part

    def _attention(self, queries: mx.array, scale: float, cores: Cores) -> mx.array:
        """Attention of the last L tokens over all offset held; the causal mask is aligned to the last key."""
        held = self.state
        mask = "causal" if queries.shape[2] > 1 else None
        n_kv_heads = held[0].shape[1]
        group = queries.shape[1] // n_kv_heads  # query heads per KV head

        def kv_heads(start: int, stop: int) -> mx.array:
            q, kv = queries[:, start * group : stop * group], [a[:, start:stop] for a in held]
            if self.bits is None:
                return mx.fast.scaled_dot_product_attention(q, *kv, scale=scale, mask=mask)
            return quantized_attention(q, kv[:3], kv[3:], scale, mask, self.group_size, self.bits)

        return cores.blocks(n_kv_heads, kv_heads, axis=1)

    def describe(self) -> dict:
        return {"type": type(self).__name__, "offset": self.offset, "bits": self.bits, "group_size": self.group_size,
                "rotated_keys": self.rotated_keys}

    def settings(self) -> dict:
        """How the cache was made, without what it holds: caches with equal settings can stand in for each other."""
        return {k: v for k, v in self.describe().items() if k not in ("offset", "evicted")}

    def settings_in_words(self) -> str:
        bound = f"bounded to {self.max_size} tokens" if self.max_size else "unbounded"
        return f"{self.bits}-bit, {bound}" if self.bits else f"float, {bound}"


class RotatingKVCache(KVCache):
    """At most max_size tokens: the first `keep`, then the most recent; evicts a block of the oldest when full.

    Under capacity it is exactly the growing cache. A chunk that crosses the capacity is attended in
    pieces, each after the eviction single-token decode would have made, so both give the same numbers.
    """

    def __init__(self, max_size: int, keep: int = 4, bits: int | None = None, group_size: int = 64,
                 evict: int | None = None):
        super().__init__(bits, group_size)
        if not isinstance(max_size, int) or max_size <= keep:
            raise QwenMLXError(f"--max-kv-size must exceed the {keep} kept (sink) tokens, got {max_size!r}")
        self.max_size, self.keep = max_size, keep
        # Evicting a quarter of the window at a time pays re-rotation once per that many tokens.
        self.evict = evict or max(1, (max_size - keep) // 4)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, rope,
               cores: Cores = NO_CORES) -> mx.array:
        outputs, start, L, shifted = [], 0, keys.shape[2], 0
        while start < L:
            if self.offset == self.max_size:
                self._evict_oldest(rope)
                shifted += self.evict
            n = min(L - start, self.max_size - self.offset)
            piece = slice(start, start + n)
            q, k = queries[:, :, piece], keys[:, :, piece]
            if shifted:  # this piece moves down with the tokens kept, as single-token decode would place it
                q, k = shift_positions(q, -shifted, rope), shift_positions(k, -shifted, rope)
            outputs.append(super().attend(q, k, values[:, :, piece], scale, rope, cores))
            start += n
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)

    def _evict_oldest(self, rope) -> None:
        """Drop `evict` tokens after the kept ones; shift the rest down and re-rotate their keys to match."""
        keep, shift, end = self.keep, self.evict, self.offset
        for buffer in self.buffers:
            buffer[..., keep : end - shift, :] = buffer[..., keep + shift : end, :]
        rotated = shift_positions(self._decoded_keys(keep, end - shift), -shift, rope)
        for buffer, part in zip(self.buffers, self._encode(rotated)):
            buffer[..., keep : end - shift, :] = part
        self.offset -= shift
        self.evicted += shift

    def describe(self) -> dict:
        return {**super().describe(), "max_size": self.max_size, "keep": self.keep, "evict": self.evict,
                "evicted": self.evicted}


def shift_positions(x: mx.array, delta: int, rope) -> mx.array:
    """Rotated queries or keys moved by delta positions: rotations compose (each token on a position axis of its own)."""
    return rope(x.reshape(-1, 1, x.shape[-1]), delta).reshape(x.shape)


def quantized_attention(queries, keys, values, scale, mask, group_size, bits) -> mx.array:
    """Scaled dot-product attention over quantized keys/values (mlx-lm's quantized_scaled_dot_product_attention)."""
    B, n_heads, L, head_dim = queries.shape
    n_kv_heads = keys[0].shape[1]
    repeats = n_heads // n_kv_heads
    queries = (queries * scale).reshape(B, n_kv_heads, repeats, L, head_dim)
    keys = [mx.expand_dims(k, 2) for k in keys]
    values = [mx.expand_dims(v, 2) for v in values]
    scores = mx.quantized_matmul(queries, *keys, transpose=True, group_size=group_size, bits=bits)
    if mask == "causal":
        n_keys = scores.shape[-1]
        visible = mx.arange(n_keys - L, n_keys)[:, None] >= mx.arange(n_keys)[None]
        scores = mx.where(visible, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, *values, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, n_heads, L, head_dim)


def kv_group_size(head_dim: int) -> int:
    """The largest MLX quantization group (64 or 32) dividing head_dim."""
    for size in (64, 32):
        if head_dim % size == 0:
            return size
    raise QwenMLXError(f"head_dim {head_dim}: a quantized KV cache needs a multiple of 32")


def kv_elements_per_token(config) -> int:
    """Keys and values of one token, over all layers."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim


def kv_cache_bytes(elements_per_token: int, tokens: int, bits: int | None = None, dtype_bytes: int = 2,
                   group_size: int = 64) -> int:
    """Memory of a cache holding `tokens`, as allocated (in steps); a quantized one adds a scale and a bias per group."""
    tokens = -(-tokens // KVCache.step) * KVCache.step
    per_element = dtype_bytes if bits is None else bits / 8 + 2 * dtype_bytes / group_size
    return math.ceil(tokens * elements_per_token * per_element)


def check_bound(max_kv_size: int | None, rotated_keys: bool) -> None:
    """--max-kv-size against the attention: a rotating cache only for keys rotated at their index (see make_cache)."""
    if max_kv_size is not None and not rotated_keys:
        raise QwenMLXError("--max-kv-size: SelfExtend and dual chunk attention place every token by its index "
                           "from the start, which evicting old tokens would change; leave the cache unbounded")


def make_cache(model, max_kv_size: int | None = None, kv_bits: int | None = None,
               keep: int = 4) -> list[KVCache]:
    """One cache per decoder layer, in the order model(tokens, cache) expects.

    Where the model's attention places keys other than at their index (attention.py), the rotating cache
    cannot serve: evicting changes every later token's index, and so where such attention places it.
    """
    group_size = kv_group_size(model.config.head_dim) if kv_bits else 64
    rotated_keys = model.layers[0].self_attn.rotated_keys
    if max_kv_size is not None:
        check_bound(max_kv_size, rotated_keys)
        return [RotatingKVCache(max_kv_size, keep, kv_bits, group_size) for _ in model.layers]
    return [KVCache(kv_bits, group_size, rotated_keys) for _ in model.layers]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def trim_to_shared_prefix(caches: list[KVCache], held: list[int], prompt: list[int]) -> int | None:
    """Trim caches holding the tokens `held` back to the longest prefix they share with prompt.

    One prompt token is always left to feed (generation needs the logits after it). Returns the tokens
    reused, or None when the point where they diverge was already evicted (the caller starts over).
    """
    shared = min(common_prefix_length(held, prompt), len(prompt) - 1)
    excess = len(held) - shared
    first = caches[0]
    trimmable = first.offset - first.keep if first.evicted else first.offset
    if excess > trimmable:
        return None
    for c in caches:
        c.trim(excess)
    return shared


def copy_caches(caches: list[KVCache]) -> list[KVCache]:
    """Copies that share memory until either side writes: MLX arrays are values, a write makes a new one."""
    copies = []
    for cache in caches:
        copy = object.__new__(type(cache))
        copy.__dict__ = dict(cache.__dict__)
        if cache.buffers is not None:
            copy.buffers = [b[...] for b in cache.buffers]
        copies.append(copy)
    return copies


def save_caches(path: str | Path, caches: list[KVCache], metadata: dict | None = None) -> None:
    """Write every layer's held tokens to one safetensors file, with how to rebuild the caches in its metadata.

    Written to a temporary file beside path, then renamed: a failed write leaves nothing behind.
    """
    path = Path(path)
    arrays = {f"{i}.{j}": a for i, cache in enumerate(caches) for j, a in enumerate(cache.state)}
    header = {CACHE_HEADER_KEY: json.dumps([c.describe() for c in caches]),
              "qwenmlx_metadata": json.dumps(metadata or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_cache_file(path: Path) -> bool:
    """Whether path is a cache file save_caches wrote (read from its header only)."""
    try:
        return CACHE_HEADER_KEY in safetensors_header(path).get("__metadata__", {})
    except QwenMLXError:
        return False


def load_caches(path: str | Path) -> tuple[list[KVCache], dict]:
    """The caches and metadata save_caches wrote."""
    path = Path(path)
    if not path.is_file():
        raise QwenMLXError(f"{path}: no such file")
    try:
        arrays, header = mx.load(str(path), return_metadata=True)
        layers = json.loads(header[CACHE_HEADER_KEY])
        metadata = json.loads(header["qwenmlx_metadata"])
        caches = []
        for i, d in enumerate(layers):
            n_parts = 2 if d["bits"] is None else 6
            caches.append(rebuild_cache(d, [arrays[f"{i}.{j}"] for j in range(n_parts)] if d["offset"] else []))
    except (KeyError, TypeError, ValueError, RuntimeError, QwenMLXError) as e:
        raise QwenMLXError(f"{path}: not a qwenmlx KV cache file ({e})") from None
    return caches, metadata


def rebuild_cache(description: dict, buffers: list[mx.array]) -> KVCache:
    """One layer's cache from its describe() and the arrays it held."""
    d = description
    if d["type"] == "RotatingKVCache":
        cache = RotatingKVCache(d["max_size"], d["keep"], d["bits"], d["group_size"], d["evict"])
        cache.evicted = d["evicted"]
    elif d["type"] == "KVCache":
        cache = KVCache(d["bits"], d["group_size"], d.get("rotated_keys", True))
    else:
        raise ValueError(f"unknown cache type {d['type']!r}")
    if any(b.ndim != 4 or b.shape[2] < d["offset"] for b in buffers):
        raise ValueError(f"arrays shorter than the {d['offset']} tokens held")
    if buffers:
        cache.buffers, cache.offset = buffers, d["offset"]
    return cache
