"""Tiny random Qwen3 / Qwen3-MoE checkpoints, written by transformers itself (the reference)."""

import json
import shutil
from pathlib import Path

import numpy as np
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


def transformers_logits(model_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """The reference: transformers' own forward pass over token ids [B, L], in float32 on the CPU -> [B, L, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def write_hf_checkpoint(dst: Path, config_kwargs: dict, dtype=torch.float32, seed: int = 0) -> Path:
    """Save like a Hub checkpoint: sharded safetensors with an index, in the given dtype."""
    model = hf_model(config_kwargs, seed).to(dtype)
    model.save_pretrained(dst, max_shard_size="20MB")
    write_hub_style_config(dst)
    write_tokenizer_files(dst)
    return dst


def write_hub_style_config(model_dir: Path) -> None:
    """Rewrite config.json the way Qwen's Hub repos have it (transformers 4.x names), which mlx-lm also reads."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    rope_parameters = config.pop("rope_parameters")
    config["rope_theta"] = rope_parameters.pop("rope_theta")
    config["rope_scaling"] = rope_parameters if rope_parameters.get("rope_type") != "default" else None
    config["torch_dtype"] = config.pop("dtype")
    path.write_text(json.dumps(config, indent=2))

def checkpoint_variant(src: Path, dst: Path, changes: dict[str, bytes | dict]) -> Path:
    """A copy of the model directory src at dst (weights linked, not copied) with some files changed."""
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            (dst / path.name).symlink_to(path)
        else:
            shutil.copy(path, dst / path.name)
    for name, change in changes.items():
        if isinstance(change, dict):
            change = json.dumps({**json.loads((dst / name).read_text()), **change}).encode()
        (dst / name).write_bytes(change)
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


def fp8_quantize_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen's -FP8 layout: float8_e4m3fn values and a float32 `weight_scale_inv` per block (w ≈ fp8 * scale)."""
    rows, cols = block
    out_dims, in_dims = w.shape
    n_rows, n_cols = -(-out_dims // rows), -(-in_dims // cols)
    padded = torch.zeros(n_rows * rows, n_cols * cols)
    padded[:out_dims, :in_dims] = w.float()
    tiles = padded.reshape(n_rows, rows, n_cols, cols)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    values = (tiles / scale[:, None, :, None]).reshape(n_rows * rows, n_cols * cols)[:out_dims, :in_dims]
    return values.to(torch.float8_e4m3fn), scale


def fp8_dequantize_blockwise(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = block
    expanded = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return values.float() * expanded[: values.shape[0], : values.shape[1]]


def write_fp8_checkpoint(dst: Path, config_kwargs: dict, block: tuple[int, int], seed: int = 0) -> Path:
    """A checkpoint in the layout of Qwen's -FP8 repos: every projection of the decoder layers in FP8."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    write_hf_checkpoint(dst, config_kwargs, dtype=torch.bfloat16, seed=seed)
    index = dst / "model.safetensors.index.json"
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(dst / shard))
        (dst / shard).unlink()
    index.unlink()
    for name in [n for n in tensors if re.search(r"layers\.\d+\..*_proj\.weight$", n)]:
        tensors[name], tensors[f"{name}_scale_inv"] = fp8_quantize_blockwise(tensors[name], block)
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
