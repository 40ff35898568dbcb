"""Qwen3 and Qwen3-MoE in MLX: the whole path from token ids to logits, as transformers defines it.

Dense Qwen3 (Qwen3-0.6B ... 32B) is the same network with an MLP in every layer instead of
the sparse mixture of experts.
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention, make_attention
from .config import ModelConfig
from .cpu_streams import NO_CORES, Cores
from .experts import ExpertsSwiGLU, StreamedExperts, make_experts
from .fusion import fuse_gate_up, gate_and_up, swiglu
from .rope import RoPE


class MLP(nn.Module):
    """SwiGLU feed-forward of the dense layers."""

    cores = NO_CORES

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        hidden = swiglu(*gate_and_up(self, lambda layer: self.cores.rows(layer, x)))
        return self.cores.rows(self.down_proj, hidden)


class SparseMoeBlock(nn.Module):
    """Router softmax in float32, top-k experts, optional renormalisation, weighted sum of their outputs."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.switch_mlp = make_experts(c)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(router logits, the top-k experts' ids) for x."""
        logits = self.gate(x)
        # Softmax is monotonic, so the top-k of the logits are the top-k of the probabilities.
        return logits, mx.argpartition(logits, kth=-self.top_k, axis=-1)[..., -self.top_k :]

    def __call__(self, x: mx.array) -> mx.array:
        logits, expert_ids = self.route(x)
        top_logits = mx.take_along_axis(logits, expert_ids, axis=-1)
        if self.norm_topk_prob:
            # The full softmax renormalised over the chosen k is the softmax of the chosen logits
            # (precise: accumulated in float32, as transformers' softmax is).
            weights = mx.softmax(top_logits, axis=-1, precise=True)
        else:
            log_norm = mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
            weights = mx.exp(top_logits.astype(mx.float32) - log_norm).astype(x.dtype)
        expert_out = self.switch_mlp(x, expert_ids)  # [..., k, hidden]
        return (weights[..., None, :] @ expert_out).squeeze(-2)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = make_attention(c, layer_idx)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = SparseMoeBlock(c) if c.is_moe_layer(layer_idx) else MLP(c.hidden_size, c.intermediate_size)

    def fuse(self) -> None:
        self.self_attn.fuse()
        if isinstance(self.mlp, SparseMoeBlock):
            self.mlp.switch_mlp.fuse()
        else:
            fuse_gate_up(self.mlp)

    def __call__(self, x: mx.array, cache: Any | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Body(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = [DecoderLayer(c, i) for i in range(c.num_hidden_layers)]
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)


class Model(nn.Module):
    """Qwen3ForCausalLM / Qwen3MoeForCausalLM; parameter names follow mlx-lm so its checkpoints load as they are."""

    cores = NO_CORES
    fingerprint: str | None = None  # which checkpoint filled the weights (checkpoint.model_fingerprint); None: unknown
    split: Any = None  # how distributed.shard split it over several ranks (distributed.Split); None: whole here

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3Body(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def load_weights(self, weights, strict: bool = True) -> "Model":
        """Load (names and shapes as on disk), then fuse projections for fewer kernels per token."""
        super().load_weights(weights, strict=strict)
        for layer in self.layers:
            layer.fuse()
        return self

    def use_cores(self, cores: Cores) -> None:
        """Split the large matmuls over these streams (one per CPU core); NO_CORES runs each as one kernel."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP, ExpertsSwiGLU, StreamedExperts, Model)):
                module.cores = cores

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def set_rope_scaling(self, scaling: dict | None) -> None:
        """Switch YaRN on, off or to another factor without reloading weights (Qwen: enable it only when needed)."""
        self.config.rope_scaling = scaling
        rope = RoPE.for_config(self.config)
        for layer in self.layers:
            layer.self_attn.set_rope(rope)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """tokens [B, L] -> logits [B, L, vocab]; cache is a list with one KV cache per layer."""
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        h = self.model.norm(h)
        if self.config.tie_word_embeddings:
            return self.cores.rows(self.model.embed_tokens, h, "as_linear")
        return self.cores.rows(self.lm_head, h)
