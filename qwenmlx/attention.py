"""Attention of a decoder layer, and the variants that read past the trained window, chosen once at load.

Every variant takes the same call, attention(x, cache), so the model never asks which one it runs:

- Attention: grouped-query attention with RoPE at each token's index (what Qwen3 was trained with).
- SelfExtendAttention: LongLM's SelfExtend (config.self_extend, set by load(path, self_extend=...)).
- DualChunkAttention: Qwen's dual chunk attention, as vLLM runs it (config.dual_chunk_attention_config,
  from Qwen's config_1m.json or load(path, dual_chunk=True)).

A variant that places keys at positions other than their index keeps them in its cache as it places them
(rotated_keys False), which the rotating cache, re-rotating keys by index as it evicts, cannot hold.
"""

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .cpu_streams import NO_CORES
from .errors import QwenMLXError
from .fusion import concatenate_rows
from .rope import RoPE


def _whole_at_least_one(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_self_extend(settings: Any) -> dict:
    """SelfExtend's {"group_size": G, "window": W}, checked: both whole numbers >= 1."""
    if not isinstance(settings, dict) or set(settings) != {"group_size", "window"}:
        raise QwenMLXError(f"self_extend must be {{'group_size': G, 'window': W}}, got {settings!r}")
    for name, value in settings.items():
        if not _whole_at_least_one(value):
            raise QwenMLXError(f"self_extend {name} must be a whole number >= 1, got {value!r}")
    return settings


def parse_self_extend(text: str) -> dict:
    """--self-extend G:W (group size, neighbour window) as load() takes it."""
    group, _, window = text.partition(":")
    try:
        return check_self_extend({"group_size": int(group), "window": int(window)})
    except (ValueError, QwenMLXError):
        raise QwenMLXError(
            f"--self-extend must be G:W, a group size and a neighbour window, both whole numbers >= 1 "
            f"(e.g. 4:2048), got {text!r}"
        ) from None


def check_past_window(self_extend: Any, dual_chunk: bool) -> None:
    """load's self_extend and dual_chunk, checked: at most one way past the trained window."""
    if self_extend is not None:
        check_self_extend(self_extend)
        if dual_chunk:
            raise QwenMLXError("--self-extend and --dual-chunk are two ways past the trained window: choose one")


def keys_at_their_index(config: ModelConfig, attention: dict | None) -> bool:
    """Whether the attention load_model builds for `config` and `attention` (its self_extend, dual_chunk, ...)
    caches keys rotated at their index (plain attention), before the model is loaded."""
    attention = attention or {}
    return not (config.dual_chunk_attention_config or attention.get("self_extend") or attention.get("dual_chunk"))


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE."""

    cores = NO_CORES  # where the projections are split (see cpu_streams.py)
    rotated_keys = True  # the cache holds keys rotated at their index

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.set_rope(RoPE.for_config(c))

    def set_rope(self, rope: RoPE) -> None:
        self.rope = rope
        # YaRN scales q and k each by attention_factor; here that product lands on the scores.
        self.scale = self.head_dim**-0.5 * rope.attention_factor**2

    def fuse(self) -> None:
        """After loading: one q|k|v projection where their quantization agrees, and the two norms' weights as one."""
        qkv = concatenate_rows([self.q_proj, self.k_proj, self.v_proj])
        if qkv is not None:
            self.qkv_proj = qkv
            del self.q_proj, self.k_proj, self.v_proj
        # Normalising q and k heads in one call needs each head's weight: q's for query heads, k's for key heads.
        self._qk_norm_weight = mx.concatenate([
            mx.broadcast_to(self.q_norm.weight, (self.n_heads, self.head_dim)),
            mx.broadcast_to(self.k_norm.weight, (self.n_kv_heads, self.head_dim)),
        ])

    def __call__(self, x: mx.array, cache: Any | None = None) -> mx.array:
        B, L, _ = x.shape
        if "qkv_proj" in self:
            qkv = self.cores.rows(self.qkv_proj, x)
        else:
            qkv = mx.concatenate([self.cores.rows(p, x) for p in (self.q_proj, self.k_proj, self.v_proj)], axis=-1)
        heads = qkv.reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)  # [B, q|k|v heads, L, head_dim]
        n_qk = self.n_heads + self.n_kv_heads
        # q and k: normalised per head, in one call over both.
        qk = mx.fast.rms_norm(heads[:, :n_qk], None, self.eps) * self._qk_norm_weight[:, None]
        out = self.attend(qk, heads[:, n_qk:], cache)
        return self.cores.rows(self.o_proj, out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, qk: mx.array, v: mx.array, cache: Any | None) -> mx.array:
        """Queries and keys (normalised, not yet rotated; query heads first) and values -> [B, heads, L, head_dim]."""
        qk = self.rope(qk, cache.offset if cache is not None else 0)  # q and k rotated in one call
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        if cache is None:
            mask = "causal" if q.shape[2] > 1 else None
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return cache.attend(q, k, v, self.scale, self.rope, self.cores)


class SelfExtendAttention(Attention):
    """SelfExtend (LongLM, Jin et al. 2024): exact positions within a neighbour window, grouped ones beyond it.

    A query at i and a key at j with i - j < window use positions i and j; any other pair uses
    i // group + window - window // group and j // group. Both score maps are merged by that rule, then
    one softmax. The distances the model sees stay within what it was trained on for ~group times longer texts.

    The cache holds keys at their grouped position j // group, which never changes; only the keys within
    the window of the queries at hand are turned on to their own position j, so a step's extra work is
    bounded by the window, not the context.
    """

    rotated_keys = False  # rotated at their grouped position, not at their index

    def __init__(self, c: ModelConfig, group_size: int, window: int):
        super().__init__(c)
        self.group_size, self.window = group_size, window

    def attend(self, qk: mx.array, v: mx.array, cache: Any | None) -> mx.array:
        G, W = self.group_size, self.window
        q, keys, values = qk[:, : self.n_heads], qk[:, self.n_heads :], v
        offset = 0 if cache is None else cache.offset
        keys = self.rope.at(keys, mx.arange(offset, offset + q.shape[2]) // G)
        if cache is not None:
            cache.store(keys, values)
            keys, values = cache.keys_and_values()

        def attend_rows(q: mx.array, start: int, end: int) -> mx.array:
            """Rows [start, end): grouped positions against every key, exact ones against the window's keys."""
            query_pos = mx.arange(start, end)
            far = grouped_scores(self.rope.at(q, query_pos // G + W - W // G), keys[:, :, :end], self.scale)
            near_start = max(0, start - W + 1)
            near_pos = mx.arange(near_start, end)
            near_keys = self.rope.at(keys[:, :, near_start:end], near_pos - near_pos // G)  # j // G -> j
            near = grouped_scores(self.rope.at(q, query_pos), near_keys, self.scale)
            distance = query_pos[:, None] - near_pos[None]
            window = mx.where(distance < W, near, far[..., near_start:])
            window = mx.where(distance >= 0, window, -mx.inf)
            return softmax_values(mx.concatenate([far[..., :near_start], window], axis=-1), values[:, :, :end])

        return in_query_blocks(q, offset, keys.shape[2], attend_rows)


# Queries are attended in blocks whose score maps (several float32 copies) stay within about this many bytes.
SCORE_BLOCK_BYTES = 256 * 2**20


def in_query_blocks(q: mx.array, offset: int, n_keys: int, attend_rows, align: int | None = None,
                    rows: int | None = None) -> mx.array:
    """attend_rows(query rows, their first and end positions) over blocks of rows, so that memory stays bounded
    in a prefill however long the context (the variants compute their score maps in full, not in a fused
    kernel). align: no block crosses a multiple of it; rows: the block size, if not bounded by memory alone."""
    B, n_heads, L, _ = q.shape
    rows = rows or max(1, SCORE_BLOCK_BYTES // (4 * 4 * B * n_heads * n_keys))
    blocks, start = [], offset
    while start < offset + L:
        end = min(start + rows, offset + L)
        if align:
            end = min(end, (start // align + 1) * align)
        blocks.append(attend_rows(q[:, :, start - offset : end - offset], start, end))
        start = end
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=2)


def grouped_scores(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """q [B, heads, L, D] against k [B, kv_heads, N, D] -> scores [B, kv_heads, heads per kv head, L, N]."""
    B, n_heads, L, D = q.shape
    n_kv_heads = k.shape[1]
    q = (q * scale).reshape(B, n_kv_heads, n_heads // n_kv_heads, L, D)
    return q @ mx.expand_dims(k, 2).swapaxes(-1, -2)


def softmax_values(scores: mx.array, values: mx.array) -> mx.array:
    """Softmax (in float32) of grouped scores, times values [B, kv_heads, N, D] -> [B, heads, L, D]."""
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(values.dtype)
    out = weights @ mx.expand_dims(values, 2)
    B, n_kv_heads, group, L, D = out.shape
    return out.reshape(B, n_kv_heads * group, L, D)


class DualChunkAttention(Attention):
    """Dual chunk attention (An et al. 2024, ChunkLlama; Qwen2.5-1M), as vLLM's DualChunkRotaryEmbedding and
    dual-chunk flash-attention backend run it, so that no distance exceeds chunk_size.

    With chunk_len = chunk_size - local_size, keys sit at j mod chunk_len. A query at i sits at
    i mod chunk_len against its own chunk, at min(i mod chunk_len + chunk_len, chunk_size) against the
    chunk before, and at min(2 chunk_len - 1, chunk_size) against all earlier ones. vLLM merges the three
    partial attentions by their log-sum-exp, which is one softmax over the three score maps joined by
    region, as here. Past original_max_position_embeddings, vLLM's length scale s = 0.1 ln(L / original) + 1
    multiplies each key as it is stored and each query, with L the whole prompt's length in prefill (also
    chunk by chunk) and the sequence's length at a decode step: a decoded token's query and key take the s
    of its step, and the prompt's keys keep theirs (vLLM's rule, kept here).

    A key's place never changes, so the cache holds keys rotated (and scaled) as they are used; within the
    first chunk (253,952 tokens with Qwen's values) it is ordinary attention, through the fused kernel.

    sparse (SparsePrefill): a long prompt's prefill keeps per head only MInference's vertical-slash pattern,
    chosen per chunk as vLLM's sparse path chooses it, and scores only the keys it keeps (VerticalSlash).
    """

    rotated_keys = False  # rotated within their chunk, not at their index

    def __init__(self, c: ModelConfig, chunk_size: int, local_size: int, original_max_position_embeddings: int,
                 sparse: "SparsePrefill | None" = None):
        super().__init__(c)
        self.chunk_size, self.chunk_len = chunk_size, chunk_size - local_size
        self.original_max = original_max_position_embeddings
        self.sparse = sparse

    def length_scale(self, length: int) -> float:
        """vLLM's scaling_factor for a sequence of `length` tokens (1 within the trained window)."""
        if self.original_max <= 0:
            return 1.0
        return max(1.0, 0.1 * math.log(length / self.original_max) + 1.0)

    def attend(self, qk: mx.array, v: mx.array, cache: Any | None) -> mx.array:
        q, keys, values = qk[:, : self.n_heads], qk[:, self.n_heads :], v
        offset, length = 0, q.shape[2]
        if cache is not None:
            offset = cache.offset
            length = max(cache.prompt_end, offset + length)
        length_scale = self.length_scale(length)
        keys = self.rope.at(keys, mx.arange(offset, offset + q.shape[2]) % self.chunk_len) * length_scale
        if cache is not None:
            cache.store(keys, values)
            keys, values = cache.keys_and_values()
        scale = self.scale * length_scale
        chunk_len, chunk_size = self.chunk_len, self.chunk_size
        sparse = self.sparse if self.sparse and q.shape[2] > 1 and length > self.sparse.threshold else None
        patterns = {}  # chunk start -> its (vertical, slash) pattern, chosen once per chunk of this prefill

        def scores_by_region(q: mx.array, start: int, end: int, succ: mx.array, inter: mx.array) -> mx.array:
            """Scores of rows [start, end) of one chunk against keys [0, end): every earlier chunk with the queries
            rotated by `inter`, the chunk before by `succ`, their own chunk (causally) at their place in it."""
            chunk_start = start // chunk_len * chunk_len
            within = mx.arange(start, end) % chunk_len
            own = grouped_scores(self.rope.at(q, within), keys[:, :, chunk_start:end], scale)
            parts = [mx.where(mx.arange(chunk_start, end)[None] <= mx.arange(start, end)[:, None], own, -mx.inf)]
            if chunk_start >= chunk_len:
                parts.insert(0, grouped_scores(self.rope.at(q, succ), keys[:, :, chunk_start - chunk_len : chunk_start],
                                               scale))
            if chunk_start > chunk_len:
                parts.insert(0, grouped_scores(self.rope.at(q, inter), keys[:, :, : chunk_start - chunk_len], scale))
            return mx.concatenate(parts, axis=-1)

        def pattern(chunk_start: int) -> "VerticalSlash":
            """vLLM's choice for a chunk of the prefill: from its last queries' attention over every key, with
            the "critical" query positions (succ unclamped, inter at chunk_size on)."""
            end = min(chunk_start + chunk_len, offset + q.shape[2])
            start = max(end - sparse.last_q, chunk_start, offset)
            last = q[:, :, start - offset : end - offset]
            within = mx.arange(start, end) % chunk_len
            scores = scores_by_region(last, start, end, within + chunk_len, within + chunk_size)
            weights = mx.softmax(scores.astype(mx.float32), axis=-1)
            B, n_kv, group, n, N = weights.shape
            indices = vertical_slash_indices(weights.reshape(B * n_kv * group, n, N), sparse.vertical, sparse.slash)
            return VerticalSlash(*indices, N)

        def attend_rows(q: mx.array, start: int, end: int) -> mx.array:
            """Rows [start, end) of one chunk: its own chunk causally, the chunk before, every earlier one."""
            chunk_start = start // chunk_len * chunk_len
            within = mx.arange(start, end) % chunk_len
            if chunk_start == 0 and sparse is None:
                mask = "causal" if end - start > 1 else None
                return mx.fast.scaled_dot_product_attention(self.rope.at(q, within), keys[:, :, :end],
                                                            values[:, :, :end], scale=scale, mask=mask)
            far = mx.full(within.shape, min(2 * chunk_len - 1, chunk_size))
            succ = mx.minimum(within + chunk_len, chunk_size)
            if sparse is None:
                return softmax_values(scores_by_region(q, start, end, succ, far), values[:, :, :end])
            if chunk_start not in patterns:
                patterns[chunk_start] = pattern(chunk_start)
            # Each region of keys with the queries rotated for it: every earlier chunk, the one before, their own.
            regions = [(0, chunk_start - chunk_len, far), (chunk_start - chunk_len, chunk_start, succ),
                       (chunk_start, end, within)]
            return patterns[chunk_start].attend(q, start, end, keys, values, scale, self.rope,
                                                [r for r in regions if r[0] >= 0 and r[1] > r[0]])

        return in_query_blocks(q, offset, keys.shape[2], attend_rows, align=self.chunk_len,
                               rows=SPARSE_QUERY_BLOCK if sparse else None)


@dataclass
class SparsePrefill:
    """One layer's MInference vertical-slash settings, per query head, as vLLM reads them from
    dual_chunk_attention_config: sparse_attention_config[layer][head] = ["vertical_and_slash", vertical, slash,
    score]; sparse only for prompts longer than sparse_attention_threshold tokens, indices chosen from the last
    sparse_attention_last_q queries of each chunk."""

    vertical: list[int]
    slash: list[int]
    threshold: int = 32768
    last_q: int = 64

    @classmethod
    def for_layer(cls, settings: dict, layer_idx: int, n_heads: int) -> "SparsePrefill":
        layers = settings.get("sparse_attention_config")
        where = "dual_chunk_attention_config.sparse_attention_config"
        if not isinstance(layers, list) or not layers:
            raise QwenMLXError(f"--sparse-prefill follows {where}, the per-layer, per-head patterns in Qwen's "
                               "config_1m.json; this model's config has none")
        heads = layers[layer_idx] if layer_idx < len(layers) else None
        if not isinstance(heads, dict) or set(heads) != {str(head) for head in range(n_heads)}:
            raise QwenMLXError(f"{where}[{layer_idx}] must give each of the {n_heads} query heads its pattern, "
                               f"got {heads!r:.80}")
        vertical, slash = [], []
        for head in range(n_heads):
            kind, *sizes = heads[str(head)][:3] if isinstance(heads[str(head)], list) else [None]
            if kind != "vertical_and_slash" or len(sizes) != 2 or not all(map(_whole_at_least_one, sizes)):
                raise QwenMLXError(f"{where}[{layer_idx}][{head}] must be [\"vertical_and_slash\", vertical size, "
                                   f"slash size, score], got {heads[str(head)]!r}")
            vertical.append(sizes[0] + 100 if sizes[0] == 30 else sizes[0])  # vLLM's widening of the smallest
            slash.append(sizes[1])
        threshold, last_q = settings.get("sparse_attention_threshold", 32768), settings.get("sparse_attention_last_q", 64)
        if not (_whole_at_least_one(threshold) or threshold == 0) or not _whole_at_least_one(last_q):
            raise QwenMLXError(f"dual_chunk_attention_config: sparse_attention_threshold must be a whole number >= 0 "
                               f"and sparse_attention_last_q >= 1, got {threshold!r} and {last_q!r}")
        return cls(vertical, slash, threshold, last_q)


# vLLM keeps the first keys as columns and the nearest distances as diagonals whatever the scores say.
FIRST_KEYS_KEPT, NEAREST_DISTANCES_KEPT = 30, 100


def vertical_slash_indices(weights: mx.array, vertical: list[int], slash: list[int]) -> tuple[mx.array, mx.array]:
    """MInference's index choice as vLLM's dual-chunk backend makes it: weights [heads, n, N] of the last n
    queries (the last at key N - 1) -> (columns [heads, max vertical], distances [heads, max slash]); a head
    keeps its `vertical` columns with the largest summed weight (the first 30 always) and its `slash`
    diagonals (query - key distances) with the largest summed weight (distances below 100 always); -1 pads."""
    H, n, N = weights.shape
    columns = weights.sum(axis=1)
    columns = mx.where(mx.arange(N) < FIRST_KEYS_KEPT, mx.inf, columns)
    # The diagonal at distance d holds, in row r (query N - n + r), the key N - n + r - d.
    key = (N - n) + mx.arange(n)[:, None] - mx.arange(N)[None]
    on_diagonal = mx.take_along_axis(weights, mx.broadcast_to(mx.maximum(key, 0), (H, n, N)), axis=-1)
    diagonals = mx.where(key >= 0, on_diagonal, 0).sum(axis=1)
    diagonals = mx.where(mx.arange(N) < NEAREST_DISTANCES_KEPT, mx.inf, diagonals)

    def largest(x: mx.array, sizes: list[int]) -> mx.array:
        ranked = mx.argsort(-x, axis=-1)[:, : min(max(sizes), N)].astype(mx.int32)
        return mx.where(mx.arange(ranked.shape[1])[None] < mx.array(sizes)[:, None], ranked, -1)

    return largest(columns, vertical), largest(diagonals, slash)


# The sparse prefill attends its queries in blocks of this many (the rows of vLLM's 64x64 blocks).
SPARSE_QUERY_BLOCK = 64


class VerticalSlash:
    """One chunk's vertical-slash pattern, attended with only the keys it keeps.

    Per head, a query keeps the chosen columns and the keys at the chosen distances before it. Masking full score
    maps costs what dense attention costs; instead each block of queries gathers, per KV head and region of keys,
    the keys that some query of the block keeps in some head of the group (the columns, and the stretch of keys
    each distance reaches from the block), scores the block against those alone, masks each query's scores to its
    own pattern and takes one softmax over the regions: the masked result, for work that grows with the keys
    kept rather than with the context.
    """

    def __init__(self, columns: mx.array, distances: mx.array, n_keys: int):
        """columns, distances: [heads, max size] from vertical_slash_indices (-1 pads); they index n_keys keys."""
        heads = columns.shape[0]

        def chosen(indices: mx.array) -> mx.array:
            marks = mx.zeros((heads, n_keys + 1), dtype=mx.bool_)  # the last slot takes the -1 padding
            marks[mx.arange(heads)[:, None], mx.where(indices < 0, n_keys, indices)] = True
            return marks & (mx.arange(n_keys + 1) < n_keys)

        self.is_column, self.is_distance = chosen(columns), chosen(distances)  # [heads, n_keys + 1]
        # distances_below[:, x]: how many chosen distances are below x
        self.distances_below = mx.concatenate([mx.zeros((heads, 1), mx.int32),
                                               mx.cumsum(self.is_distance.astype(mx.int32), axis=1)], axis=1)

    def attend(self, q: mx.array, start: int, end: int, keys: mx.array, values: mx.array, scale: float, rope: RoPE,
               regions: list[tuple[int, int, mx.array]]) -> mx.array:
        """Rows [start, end) (q not yet rotated) against keys [B, kv_heads, N, D]; regions: (first key, end key,
        the query positions to rotate by against them) -> [B, heads, rows, D]."""
        B, n_heads, rows, D = q.shape
        n_kv = keys.shape[1]
        group = n_heads // n_kv
        query_pos = mx.arange(start, end)[:, None]
        no_distance = self.is_distance.shape[1] - 1

        def per_kv_head(table: mx.array) -> mx.array:
            return table.reshape(B, n_kv, group, *table.shape[1:])

        kept_by_region = []  # [B, kv_heads, keys of the region]: kept by some query of the block, in some head
        for first, stop, _ in regions:
            key_pos = mx.arange(first, stop)
            below = mx.take(self.distances_below, end - key_pos, axis=1)
            below_start = mx.take(self.distances_below, mx.maximum(start - key_pos, 0), axis=1)
            kept_by_region.append(per_kv_head(self.is_column[:, first:stop] | (below > below_start)).any(axis=2))
        counts = mx.stack([kept.sum(-1).max(axis=0) for kept in kept_by_region]).tolist()  # [region][kv head]
        queries = [rope.at(q, positions) * scale for _, _, positions in regions]
        is_column, is_distance = per_kv_head(self.is_column), per_kv_head(self.is_distance)[:, :, :, None]

        outputs = []
        for h in range(n_kv):  # the heads of a group share their gathered keys, as they share their keys
            scores, kept_values = [], []
            for (first, stop, _), kept, count, query in zip(regions, kept_by_region, counts, queries):
                if count[h] == 0:
                    continue
                order = mx.arange(stop - first)
                index = mx.argsort(mx.where(kept[:, h], order, order + stop), axis=-1)[:, : count[h], None] + first
                gathered_keys = mx.take_along_axis(keys[:, h], index, axis=1)[:, None]  # [B, 1, M, D]
                kept_values.append(mx.take_along_axis(values[:, h], index, axis=1)[:, None])
                index = index.swapaxes(1, 2)  # [B, 1, M]
                distance = query_pos - index[..., None, :]  # [B, 1, rows, M]
                on_diagonal = mx.take_along_axis(is_distance[:, h], mx.where(distance >= 0, distance, no_distance),
                                                 axis=-1)
                in_pattern = (distance >= 0) & (mx.take_along_axis(is_column[:, h], index, axis=-1)[:, :, None]
                                                | on_diagonal)
                block = query[:, h * group : (h + 1) * group] @ gathered_keys.swapaxes(-1, -2)
                scores.append(mx.where(in_pattern, block, -mx.inf))
            weights = mx.softmax(mx.concatenate(scores, axis=-1).astype(mx.float32), axis=-1)
            kept_values = mx.concatenate(kept_values, axis=2)
            outputs.append(weights.astype(kept_values.dtype) @ kept_values)
        return mx.concatenate(outputs, axis=1)


def make_attention(config: ModelConfig, layer_idx: int) -> Attention:
    """The attention layer `config` asks for: dual chunk attention where the config carries Qwen's
    dual_chunk_attention_config (with sparse prefill where config.sparse_prefill is set), SelfExtend where
    config.self_extend is set, else plain."""
    if config.dual_chunk_attention_config:
        settings = config.dual_chunk_attention_config
        sparse = None
        if config.sparse_prefill:
            sparse = SparsePrefill.for_layer(settings, layer_idx, config.num_attention_heads)
        return DualChunkAttention(config, settings["chunk_size"], settings["local_size"],
                                  settings.get("original_max_position_embeddings", 0), sparse)
    if config.self_extend:
        return SelfExtendAttention(config, **check_self_extend(config.self_extend))
    return Attention(config)
