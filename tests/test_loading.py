"""Loading: what load() accepts (dirs, Hub ids through the local cache) and the one-line errors for bad input."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import qwenmlx
from qwenmlx.checkpoint import load_model, resolve_model_dir
from qwenmlx.config import config_from_dict
from qwenmlx.errors import QwenMLXError
from qwenmlx.tokenizer import Tokenizer
from tests.errors import one_line_error

REAL_CONFIG = json.loads((Path(__file__).parent / "fixtures" / "config-Qwen3-30B-A3B.json").read_text())


@pytest.fixture
def broken_copy(moe_dir, tmp_path):
    """A writable copy of the tiny checkpoint, for tests that damage it."""
    dst = tmp_path / "model"
    shutil.copytree(moe_dir, dst)
    return dst


def first_shard(model_dir: Path) -> Path:
    return sorted(model_dir.glob("model-*.safetensors"))[0]


def test_load_returns_model_and_the_checkpoints_tokenizer(moe_dir):
    model, tokenizer = qwenmlx.load(moe_dir)
    assert isinstance(tokenizer, Tokenizer)
    ids = tokenizer.encode("Hello, Qwen3!")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), model.config.vocab_size)


def test_real_qwen3_30b_a3b_config_reads_into_the_dataclass():
    c = config_from_dict(REAL_CONFIG)
    assert (c.num_hidden_layers, c.num_experts, c.num_experts_per_tok) == (48, 128, 8)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 4, 128)
    assert all(c.is_moe_layer(i) for i in range(48))


def test_transformers_5_config_names_are_understood():
    raw = {k: v for k, v in REAL_CONFIG.items() if k not in ("num_experts", "rope_theta", "rope_scaling")}
    raw.update(num_local_experts=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    c = config_from_dict(raw)
    assert c.num_experts == 128 and c.rope_theta == 1e6 and c.rope_scaling is None


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """Point huggingface_hub at a cache of our making, offline (its settings are read at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_id_is_read_from_the_local_hugging_face_cache(moe_dir, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-Tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(moe_dir, snapshot)
    (tmp_path / "hub" / "models--Qwen--Qwen3-Tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--Qwen--Qwen3-Tiny" / "refs" / "main").write_text("a" * 40)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    assert resolve_model_dir("Qwen/Qwen3-Tiny") == snapshot
    model, _ = load_model("Qwen/Qwen3-Tiny")
    reference, _ = load_model(moe_dir)
    tokens = mx.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(reference(tokens)))


def test_hub_id_missing_offline_says_how_to_get_it(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(QwenMLXError, match="Qwen/Qwen3-Nope: not in the local Hugging Face cache"):
        resolve_model_dir("Qwen/Qwen3-Nope")


def test_lazy_load_reads_no_weights_until_evaluated(moe_dir):
    model, _ = load_model(moe_dir, lazy=True)
    tokens = mx.array([[1, 2, 3]])
    eager, _ = load_model(moe_dir)
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(eager(tokens)))


def error_of(model_dir) -> str:
    return one_line_error(load_model, model_dir)


def test_missing_directory_is_a_clear_error(tmp_path):
    assert "no such directory" in error_of(tmp_path / "nowhere" / "model")


def test_missing_config_is_a_clear_error(broken_copy):
    (broken_copy / "config.json").unlink()
    assert error_of(broken_copy) == f"{broken_copy / 'config.json'}: no config.json in the model directory"


def test_unknown_model_type_is_named(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    assert "config.json: unsupported model_type 'llama'" in error_of(broken_copy)


def test_missing_field_is_named(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    del config["hidden_size"]
    (broken_copy / "config.json").write_text(json.dumps(config))
    assert "config.json: missing field 'hidden_size'" in error_of(broken_copy)


def test_inconsistent_heads_are_named(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps(dict(config, num_key_value_heads=3)))
    assert "field 'num_key_value_heads' (3) must divide num_attention_heads (4)" in error_of(broken_copy)


def test_config_that_is_not_json_is_named(broken_copy):
    (broken_copy / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in error_of(broken_copy)


def test_truncated_shard_is_named(broken_copy):
    shard = first_shard(broken_copy)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert error_of(broken_copy).startswith(f"{shard}: truncated or corrupted safetensors file")


def test_corrupted_shard_header_is_named(broken_copy):
    shard = first_shard(broken_copy)
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    assert error_of(broken_copy).startswith(f"{shard}: corrupted safetensors file")


def test_shard_named_in_the_index_but_absent_is_named(broken_copy):
    shard = first_shard(broken_copy)
    shard.unlink()
    assert error_of(broken_copy) == f"{shard}: shard named in model.safetensors.index.json is missing"


def test_shape_that_disagrees_with_the_config_is_named(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps(dict(config, intermediate_size=128, moe_intermediate_size=48)))
    message = error_of(broken_copy)
    assert "has shape" in message and "config.json implies" in message


def test_missing_tensor_is_named(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=4)))
    assert "checkpoint is missing tensor model.layers.3." in error_of(broken_copy)


def test_cli_prints_one_line_and_exits_1_without_traceback(broken_copy):
    import subprocess
    import sys

    (broken_copy / "config.json").unlink()
    result = subprocess.run([sys.executable, "-m", "qwenmlx", "info", str(broken_copy)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {broken_copy / 'config.json'}: no config.json in the model directory"]
