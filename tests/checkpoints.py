"""Tiny random Qwen3 / Qwen3-MoE checkpoints, written by transformers itself (the reference)."""

from pathlib import Path

import torch

from tests.qwen_tokenizer_files import write_tokenizer_files

VOCAB = 151936  # the real Qwen3 vocabulary size, so the real tokenizer fits

TINY_MOE = dict(
    model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
    moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_DENSE = dict(
    model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def hf_config(**kwargs):
    from transformers import Qwen3Config, Qwen3MoeConfig

    kwargs = dict(kwargs)
    config_class = Qwen3MoeConfig if kwargs.pop("model_type") == "qwen3_moe" else Qwen3Config
    rope_scaling = kwargs.pop("rope_scaling", None)
    theta = kwargs.pop("rope_theta")
    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling:
        rope_parameters = {"rope_theta": theta, **rope_scaling}
    return config_class(rope_parameters=rope_parameters, **kwargs)


def hf_model(config_kwargs: dict, seed: int = 0):
    """A seeded random model; weights drawn wider than the default init so routing has clear winners."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(**config_kwargs), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def write_hf_checkpoint(dst: Path, config_kwargs: dict, dtype=torch.float32, seed: int = 0) -> Path:
    """Save like a Hub checkpoint: sharded safetensors with an index, in the given dtype."""
    model = hf_model(config_kwargs, seed).to(dtype)
    model.save_pretrained(dst, max_shard_size="20MB")
    write_tokenizer_files(dst)
    return dst

# Each variant exercises one structural option of the config against transformers.
MODEL_VARIANTS = {
    "moe": TINY_MOE,
    "moe-gqa-4to1-tied": dict(TINY_MOE, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                              tie_word_embeddings=True),
    "moe-mha-mlp-only-layers": dict(TINY_MOE, num_key_value_heads=4, mlp_only_layers=[1]),
    "moe-sparse-step-2-no-renorm": dict(TINY_MOE, decoder_sparse_step=2, norm_topk_prob=False),
    "dense": TINY_DENSE,
    "dense-tied": dict(TINY_DENSE, tie_word_embeddings=True, num_key_value_heads=1),
}
