"""Numpy references of the attention methods that read past the trained window, written from their authors' code.

Each takes queries and keys *before* RoPE (q [B, heads, L, D], k and v [B, kv_heads, L, D]) for a whole
prompt and returns the attention output [B, heads, L, D]. `reference_logits` runs transformers' own
Qwen3 with its attention replaced by one of them: the full-model reference the MLX model is checked against.
"""

from unittest import mock

import numpy as np
import torch


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """transformers' default rotary embedding (rotate_half form) at integer positions [L]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    freqs = positions[:, None].astype(np.float64) * inv_freq[None]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return (x * np.cos(emb) + rotate_half(x) * np.sin(emb)).astype(x.dtype)


def repeat_kv(x: np.ndarray, n_heads: int) -> np.ndarray:
    return np.repeat(x, n_heads // x.shape[1], axis=1)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def causal_rope_attention(q, k, v, theta: float, scale: float) -> np.ndarray:
    """Ordinary causal attention with RoPE at each token's index (what Qwen3 was trained with)."""
    L = q.shape[2]
    pos = np.arange(L)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = rope(q, pos, theta) @ rope(k, pos, theta).swapaxes(-1, -2) * scale
    scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    return softmax(scores) @ v


def self_extend_attention(q, k, v, theta: float, scale: float, group_size: int, window: int) -> np.ndarray:
    """LongLM's self_extend_forward, the non-flash prefill path (q_len == kv_seq_len).

    Source: datamllab/LongLM, self_extend_patch/Llama_4_40.py and Qwen2.py (`self_extend_forward`), with
    the group query position as fixed in its commit "Fix group query position calculation" (floor division):
    group_query_position = query_position // group_size_1 + group_size_2 - group_size_2 // group_size_1,
    group_key_position = key_position // group_size_1; the neighbour mask is the causal mask minus a causal
    mask shifted down by group_size_2; torch.where(neighbour, neighbour scores, group scores), one softmax.
    (LongLM's `_re_group_size_2` zeroes the shift only while no pair is past the window, where the group
    scores are all masked out anyway.) group_size_1 = group_size, group_size_2 = window.
    """
    L = q.shape[2]
    query_position = key_position = np.arange(L)
    neighbor_q = rope(q, query_position, theta)
    neighbor_k = rope(k, key_position, theta)
    re_window = 0 if query_position.max() < window else window
    group_q = rope(q, query_position // group_size + re_window - re_window // group_size, theta)
    group_k = rope(k, key_position // group_size, theta)
    neighbor_k, group_k, v = (repeat_kv(a, q.shape[1]) for a in (neighbor_k, group_k, v))

    neighbor_scores = neighbor_q @ neighbor_k.swapaxes(-1, -2) * scale
    group_scores = group_q @ group_k.swapaxes(-1, -2) * scale
    causal = np.tril(np.ones((L, L), bool))
    neighbor_scores = np.where(causal, neighbor_scores, -np.inf)
    group_scores = np.where(causal, group_scores, -np.inf)

    neighbor_mask = np.tril(np.ones((L, L)))
    if L - window > 0:
        neighbor_mask[window:, :-window] -= np.tril(np.ones((L - window, L - window)))
    scores = np.where(neighbor_mask.astype(bool), neighbor_scores, group_scores)
    return softmax(scores) @ v


def dual_chunk_attention(q, k, v, theta: float, scale: float, chunk_size: int, local_size: int,
                         original_max_position_embeddings: int, prompt_length: int | None = None,
                         sparse: tuple[int, int, int] | None = None) -> np.ndarray:
    """Dual chunk attention as vLLM runs it: a prompt's prefill, then each later token's decode step.

    Source: vllm-project/vllm, vllm/model_executor/layers/rotary_embedding/dual_chunk_rope.py
    (DualChunkRotaryEmbedding: q_t, qc_t clamped to chunk_size, k_t = position % chunk_len, and query_inter
    at qc_t[chunk_len - 1]) and vllm/attention/backends/dual_chunk_flash_attn.py
    (DualChunkFlashAttentionImpl: scaling_factor = clip(0.1 ln(orig_seq_len / original_max_position_embeddings)
    + 1, min=1) with orig_seq_len = max(prompt_len, seq_len); each token's key multiplied by the factor of
    the step that stored it; the prefill's softmax scale and a decode step's query by the factor of their
    step; _dual_chunk_flash_attn_prefill_func's walk over chunks with its intra (causal), succ and inter
    (non-causal) flash attentions; _merge_attn_outputs' log-sum-exp merge). Per query head, as its non-sparse
    path. Rows past prompt_length (default: all rows are the prompt) are decode steps: a decode step's
    intra/succ/inter split of the cache (seq_lens_intra, _succ, _inter) is its row's split here, and with
    causal attention its output is its row's.

    sparse = (vertical size, slash size, last_q), for every head: the prompt's prefill as vLLM's sparse path
    chooses its indices (per chunk, from the last_q queries' attention over every key, queries at the
    "critical" positions: succ unclamped at position % chunk_len + chunk_len, inter at position % chunk_len +
    chunk_size; vertical_slash_indices), then each query keeps the chosen keys and those at the chosen distances.
    """
    L = q.shape[2]
    chunk_len = chunk_size - local_size
    positions = np.arange(L)
    key = rope(k, positions % chunk_len, theta)
    query = rope(q, positions % chunk_len, theta)
    query_succ = rope(q, np.minimum(positions % chunk_len + chunk_len, chunk_size), theta)
    query_inter = rope(q, np.full(L, min(chunk_len - 1 + chunk_len, chunk_size)), theta)
    query_succ_critical = rope(q, positions % chunk_len + chunk_len, theta)
    query_inter_critical = rope(q, positions % chunk_len + chunk_size, theta)
    queries = [query, query_succ, query_inter, query_succ_critical, query_inter_critical]
    if original_max_position_embeddings > 0:
        orig_seq_len = np.maximum(prompt_length or L, positions + 1)
        scaling_factor = np.maximum(0.1 * np.log(orig_seq_len / original_max_position_embeddings) + 1.0, 1.0)
        key = key * scaling_factor[:, None]
        queries = [x * scaling_factor[:, None] for x in queries]
    query, query_succ, query_inter, query_succ_critical, query_inter_critical = queries

    def flash_attn(q_part, k_part, v_part, causal, kept=None):
        """(output, log-sum-exp) of one head; causal aligned to the bottom right, as flash-attn's; kept: the
        sparse pattern's [queries, keys] (a row with nothing kept weighs nothing in the merge)."""
        scores = q_part @ k_part.T * scale
        if causal:
            n_q, n_k = scores.shape
            scores = np.where(np.arange(n_k)[None] <= np.arange(n_k - n_q, n_k)[:, None], scores, -np.inf)
        if kept is not None:
            scores = np.where(kept, scores, -np.inf)
        top = np.where(np.isfinite(scores.max(-1, keepdims=True)), scores.max(-1, keepdims=True), 0)
        total = np.exp(scores - top).sum(-1, keepdims=True)
        lse = (np.log(total) + top)[:, 0]
        return np.nan_to_num(np.exp(scores - top) / total) @ v_part, lse

    def sparse_pattern(head, begin, end, prev_chunk_end_pos):
        """[end - begin, end]: the keys rows begin..end keep, chosen from the last queries of the segment."""
        vertical_size, slash_size, last_q = sparse
        vertical_size += 100 if vertical_size == 30 else 0  # as _dual_chunk_flash_attn_prefill does
        last = slice(end - min(end - begin, last_q), end)
        k_head = key[0, head // group]
        qk = [query[0, head, last] @ k_head[prev_chunk_end_pos:end].T * scale]
        if prev_chunk_end_pos - chunk_len >= 0:
            qk.insert(0, query_succ_critical[0, head, last] @ k_head[prev_chunk_end_pos - chunk_len : prev_chunk_end_pos].T
                      * scale)
        if prev_chunk_end_pos - chunk_len * 2 >= 0:
            qk.insert(0, query_inter_critical[0, head, last] @ k_head[: prev_chunk_end_pos - chunk_len].T * scale)
        qk = np.concatenate(qk, axis=-1)
        n = qk.shape[0]
        qk[:, -n:] = np.where(np.tril(np.ones((n, n), bool)), qk[:, -n:], -np.inf)
        [columns], [distances] = vertical_slash_indices(softmax(qk)[None], [vertical_size], [slash_size])
        rows, keys = np.arange(begin, end)[:, None], np.arange(end)[None]
        return np.isin(keys, list(columns)) | np.isin(rows - keys, list(distances))

    def merge(results):
        outputs = np.stack([r[0] for r in results])
        lse = np.stack([r[1] for r in results])
        weights = np.exp(lse - lse.max(0))
        weights /= weights.sum(0)
        return (outputs * weights[..., None]).sum(0)

    group = q.shape[1] // k.shape[1]
    out = np.zeros_like(q)
    for head in range(q.shape[1]):
        k_head, v_head = key[0, head // group], v[0, head // group]
        begin, rows = 0, []
        while begin < L:
            prev_chunk_end_pos = (begin // chunk_len) * chunk_len
            end = min(prev_chunk_end_pos + chunk_len, L)
            kept = np.ones((end - begin, end), bool) if sparse is None else \
                sparse_pattern(head, begin, end, prev_chunk_end_pos)
            own = slice(prev_chunk_end_pos, end)
            results = [flash_attn(query[0, head, begin:end], k_head[own], v_head[own], True, kept[:, own])]
            if prev_chunk_end_pos - chunk_len >= 0:
                previous = slice(prev_chunk_end_pos - chunk_len, prev_chunk_end_pos)
                results.append(flash_attn(query_succ[0, head, begin:end], k_head[previous], v_head[previous], False,
                                          kept[:, previous]))
            if prev_chunk_end_pos - chunk_len * 2 >= 0:
                earlier = slice(0, prev_chunk_end_pos - chunk_len)
                results.append(flash_attn(query_inter[0, head, begin:end], k_head[earlier], v_head[earlier], False,
                                          kept[:, earlier]))
            rows.append(merge(results))
            begin = end
        out[0, head] = np.concatenate(rows)
    return out


def sum_all_diagonal_matrix(mat: np.ndarray) -> np.ndarray:
    """vLLM's _sum_all_diagonal_matrix: [h, n, m] -> [h, n + m - 1], the sums along each diagonal, from the one
    through the bottom-left corner's right neighbour to the top-right corner (padded, then strided)."""
    h, n, m = mat.shape
    zero = np.zeros((h, n, n), mat.dtype)
    padded = np.ascontiguousarray(np.concatenate([zero, mat, zero], axis=-1))
    item = padded.itemsize
    strided = np.lib.stride_tricks.as_strided(padded, (h, n, n + m), (n * (2 * n + m) * item, (2 * n + m + 1) * item,
                                                                      item))
    return strided.sum(1)[:, 1:]


def vertical_slash_indices(weights: np.ndarray, vertical_sizes, slash_sizes):
    """The sparse prefill's index choice in vLLM's _dual_chunk_flash_attn_prefill_func, per head.

    Source: vllm-project/vllm, vllm/attention/backends/dual_chunk_flash_attn.py: weights = the softmax of the
    last queries' scores (causal in the last block); vertical = weights summed over the queries, the first 30
    set to inf, topk(vertical size); slash = _sum_all_diagonal_matrix, the top-right corner dropped
    ([:-last_q + 1]), the last 100 set to inf, topk(slash size); a slash index t is handed on as the distance
    (N - 1) - t (the intra stage's `(qk.size(-1) - 1) - slash_topk`). Returns per head the set of columns and the
    set of distances.
    """
    H, n, N = weights.shape
    vertical = weights.sum(1)
    vertical[:, :30] = np.inf
    columns, distances = [], []
    for head in range(H):
        columns.append(set(np.argsort(-vertical[head], kind="stable")[: min(vertical_sizes[head], N)].tolist()))
        slash = sum_all_diagonal_matrix(weights[head : head + 1])
        if n != 1:
            slash = slash[..., : -n + 1]
        slash[..., -100:] = np.inf
        top = np.argsort(-slash[0], kind="stable")[: min(slash_sizes[head], N)]
        distances.append(set((N - 1 - top).tolist()))
    return columns, distances


def reference_logits(model_dir, tokens: np.ndarray, attention) -> np.ndarray:
    """Logits of transformers' model with RoPE left out and attention(q, k, v, scale) (numpy) in its place."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3 import modeling_qwen3
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    def replaced_attention(module, query, key, value, attention_mask, scaling, **kwargs):
        out = attention(query.numpy(), key.numpy(), value.numpy(), scaling)
        return torch.from_numpy(np.ascontiguousarray(out.swapaxes(1, 2))), None

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad(), mock.patch.multiple(modeling_qwen3_moe, apply_rotary_pos_emb=lambda q, k, *a, **kw: (q, k),
                                              eager_attention_forward=replaced_attention), \
            mock.patch.multiple(modeling_qwen3, apply_rotary_pos_emb=lambda q, k, *a, **kw: (q, k),
                                eager_attention_forward=replaced_attention):
        return model(torch.tensor(tokens)).logits.numpy()
