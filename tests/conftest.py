"""Session-wide fixtures: tiny random checkpoints written once by transformers and shared by all tests."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import TINY_DENSE, TINY_MOE, write_hf_checkpoint  # noqa: E402

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


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """A function returning the directory of a tiny checkpoint, written on first request only."""
    written = {}

    def get(variant: str = "moe", dtype=torch.float32) -> Path:
        key = (variant, dtype)
        if key not in written:
            dst = tmp_path_factory.mktemp(f"ckpt-{variant}-{str(dtype).split('.')[-1]}")
            written[key] = write_hf_checkpoint(dst, MODEL_VARIANTS[variant], dtype=dtype)
        return written[key]

    return get


@pytest.fixture(scope="session")
def moe_dir(checkpoint_dir) -> Path:
    return checkpoint_dir("moe")
