"""Checkpoints written by mlx_lm.convert (plain and quantized) load in qwenmlx with mlx-lm's own logits."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import convert as mlx_lm_convert
from mlx_lm import load as mlx_lm_load

from qwenmlx.checkpoint import load_model

CONVERSIONS = {
    "float32": dict(),
    "affine-4bit-g32": dict(quantize=True, q_bits=4, q_group_size=32),
    "affine-6bit-g32": dict(quantize=True, q_bits=6, q_group_size=32),
    "affine-8bit-g64-experts-skipped": dict(quantize=True, q_bits=8, q_group_size=64),
    "mixed_3_6-per-module": dict(quantize=True, q_bits=4, q_group_size=32, quant_predicate="mixed_3_6"),
    "mxfp4": dict(quantize=True, q_mode="mxfp4", q_bits=4, q_group_size=32),
    "mxfp8": dict(quantize=True, q_mode="mxfp8", q_bits=8, q_group_size=32),
}


@pytest.fixture(scope="module")
def converted(moe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_lm_converted")
    paths = {}

    def get(name):
        if name not in paths:
            paths[name] = root / name
            mlx_lm_convert(str(moe_dir), str(paths[name]), dtype="float32", **CONVERSIONS[name])
        return paths[name]

    return get


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_mlx_lm_checkpoint_loads_with_mlx_lm_logits(converted, name):
    path = converted(name)
    tokens = mx.array(np.random.default_rng(0).integers(0, 151_000, (1, 70)))
    reference, _ = mlx_lm_load(str(path))
    ours, _ = load_model(path)
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(reference(tokens)), atol=1e-4, rtol=0)


def test_quantized_modules_follow_the_config_per_module(converted):
    model, _ = load_model(converted("mixed_3_6-per-module"))
    bits = {path: module.bits for path, module in model.named_modules() if hasattr(module, "bits")}
    # mlx-lm's mixed recipe gives v_proj and down_proj more bits in the last layer of three, not the first.
    assert bits["model.layers.2.self_attn.v_proj"] == bits["model.layers.2.mlp.switch_mlp.down_proj"] == 6
    assert bits["model.layers.0.self_attn.qkv_proj"] == bits["model.layers.0.mlp.switch_mlp.down_proj"] == 3
    assert bits["lm_head"] == 6
    # Projections are fused only where their quantization agrees: q|k|v in layer 0, not in layer 2.
    assert "qkv_proj" in model.layers[0].self_attn and "qkv_proj" not in model.layers[2].self_attn
    assert all("gate_up_proj" in layer.mlp.switch_mlp for layer in model.layers)
