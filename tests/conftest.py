"""Session-wide fixtures: the real Qwen3 tokenizer and tiny random checkpoints, each written once."""

from pathlib import Path

import pytest
import torch

from tests.checkpoints import MODEL_VARIANTS, write_hf_checkpoint
from tests.qwen_tokenizer_files import write_tokenizer_files
from tests.serving import MAX_BATCH, MAX_QUEUE, ORIGIN, running_server


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A directory holding Qwen3's real tokenizer files (tokenizer.json rebuilt from qwen.tiktoken)."""
    path = tmp_path_factory.mktemp("qwen_tokenizer")
    write_tokenizer_files(path)
    return path


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """A function returning the directory of a tiny checkpoint (with the real tokenizer), written on first request."""
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


@pytest.fixture(scope="session")
def moe_dir_other_weights(tmp_path_factory) -> Path:
    """The tiny MoE checkpoint's architecture with other random weights: every safetensors header the same."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("ckpt-moe-seed-1"), MODEL_VARIANTS["moe"], seed=1)


@pytest.fixture(scope="session")
def server(moe_dir, tmp_path_factory):
    """One `qwenmlx serve` for every test that drives the server as a client would."""
    with running_server(moe_dir, tmp_path_factory.mktemp("serve") / "server.log",
                        "--cors-origin", ORIGIN, "--max-queue", str(MAX_QUEUE), "--max-batch", str(MAX_BATCH)) as server:
        yield server
