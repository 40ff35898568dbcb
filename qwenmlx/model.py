"""Qwen3 and Qwen3-MoE in MLX: the whole path from token ids to logits, as transformers defines it.

Dense Qwen3 (Qwen3-0.6B ... 32B) is the same network with an MLP in every layer instead of
the sparse mixture of experts.
"""

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention, make_attention
from .config import ModelConfig
from .cpu_streams import NO_CORES, Cores
from .fused import concatenate_rows
from .rope import RoPE


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


def fuse_gate_up(block: nn.Module) -> None:
    fused = concatenate_rows([block.gate_proj, block.up_proj])
    if fused is not None:
        block.gate_up_proj = fused
        del block.gate_proj, block.up_proj


def gate_and_up(block: nn.Module, project) -> tuple[mx.array, mx.array]:
    """The gate and up projections, through project(layer), from one fused layer where there is one."""
    if "gate_up_proj" in block:
        return mx.split(project(block.gate_up_proj), 2, axis=-1)
    return project(block.gate_proj), project(block.up_proj)


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

    def __call__(self, x: mx.array, expert_ids: mx.array) -> mx.array:
        """x: [..., hidden], expert_ids: [..., k] -> [..., k, hidden]."""
        k = expert_ids.shape[-1]
        # Several tokens (a prefill chunk, a batch of sequences decoding): group rows by expert so each
        # expert's weights are read once for all the tokens that chose it, as one larger matmul.
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


class SparseMoeBlock(nn.Module):
    """Router softmax in float32, top-k experts, optional renormalisation, weighted sum of their outputs."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.switch_mlp = ExpertsSwiGLU(c.hidden_size, c.moe_intermediate_size, c.num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.gate(x)
        # Softmax is monotonic, so the top-k of the logits are the top-k of the probabilities.
        expert_ids = mx.argpartition(logits, kth=-self.top_k, axis=-1)[..., -self.top_k :]
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
        fuse_gate_up(self.mlp.switch_mlp if isinstance(self.mlp, SparseMoeBlock) else self.mlp)

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
            if isinstance(module, (Attention, MLP, ExpertsSwiGLU, Model)):
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
