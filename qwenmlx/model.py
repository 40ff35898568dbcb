"""Qwen3 and Qwen3-MoE in MLX: the whole path from token ids to logits, as transformers defines it.

Dense Qwen3 (Qwen3-0.6B ... 32B) is the same network with an MLP in every layer instead of
the sparse mixture of experts.
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .rope import RoPE


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE."""

    def __init__(self, c: ModelConfig, rope: RoPE):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.set_rope(rope)

    def set_rope(self, rope: RoPE) -> None:
        self.rope = rope
        # YaRN scales q and k each by attention_factor; here that product lands on the scores.
        self.scale = self.head_dim**-0.5 * rope.attention_factor**2

    def __call__(self, x: mx.array, cache: Any | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        if cache is None:
            q, k = self.rope(q), self.rope(k)
            mask = "causal" if L > 1 else None
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:
            out = cache.attend(q, k, v, self.scale, self.rope)  # the cache picks the positions
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward of the dense layers."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = ExpertLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = ExpertLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = ExpertLinear(intermediate_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, expert_ids: mx.array) -> mx.array:
        """x: [..., hidden], expert_ids: [..., k] -> [..., k, hidden]."""
        k = expert_ids.shape[-1]
        # Many tokens: group rows by expert so each expert's weights are read once, as one large matmul.
        sort = expert_ids.size >= 64
        if sort:
            flat_ids = expert_ids.flatten()
            order = mx.argsort(flat_ids)
            rows = x.reshape(-1, 1, x.shape[-1])[order // k]
            ids = flat_ids[order]
        else:
            rows, ids = mx.expand_dims(x, (-2, -3)), expert_ids
        h = nn.silu(self.gate_proj(rows, ids, sort)) * self.up_proj(rows, ids, sort)
        out = self.down_proj(h, ids, sort)
        if sort:
            out = out[mx.argsort(order)].reshape(*expert_ids.shape, -1)
        else:
            out = out.squeeze(-2)
        return out


class SparseMoeBlock(nn.Module):
    """Router softmax in float32, top-k experts, optional renormalisation, weighted sum of their outputs."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.switch_mlp = ExpertsSwiGLU(c.hidden_size, c.moe_intermediate_size, c.num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        expert_ids = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        weights = mx.take_along_axis(probs, expert_ids, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        expert_out = self.switch_mlp(x, expert_ids)
        return (expert_out * weights[..., None].astype(x.dtype)).sum(axis=-2)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx: int, rope: RoPE):
        super().__init__()
        self.self_attn = Attention(c, rope)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = SparseMoeBlock(c) if c.is_moe_layer(layer_idx) else MLP(c.hidden_size, c.intermediate_size)

    def __call__(self, x: mx.array, cache: Any | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Body(nn.Module):
    def __init__(self, c: ModelConfig, rope: RoPE):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = [DecoderLayer(c, i, rope) for i in range(c.num_hidden_layers)]
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)


class Model(nn.Module):
    """Qwen3ForCausalLM / Qwen3MoeForCausalLM; parameter names follow mlx-lm so its checkpoints load as they are."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3Body(config, self._make_rope(config.rope_scaling))
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def _make_rope(self, scaling: dict | None) -> RoPE:
        c = self.config
        return RoPE(c.head_dim, c.rope_theta, scaling, c.max_position_embeddings)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def set_rope_scaling(self, scaling: dict | None) -> None:
        """Switch YaRN on, off or to another factor without reloading weights (Qwen: enable it only when needed)."""
        rope = self._make_rope(scaling)
        self.config.rope_scaling = scaling
        for layer in self.layers:
            layer.self_attn.set_rope(rope)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """tokens [B, L] -> logits [B, L, vocab]; cache is a list with one KV cache per layer."""
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        h = self.model.norm(h)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)
