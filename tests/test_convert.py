"""Converting and quantizing: what lands on disk, that qwenmlx and mlx-lm both read it, and how close it stays."""

import json
import math
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import load_file
from typer.testing import CliRunner

import qwenmlx.convert as conversion
from quantize import BUILTIN_RECIPES, QuantParams, get_recipe, read_recipe_file
from qwenmlx.cache import kv_cache_bytes, kv_elements_per_token
from qwenmlx.checkpoint import load_model, safetensors_header, weight_files
from qwenmlx.cli import app
from qwenmlx.config import config_from_dict
from qwenmlx.convert import convert, memory_plan, plan_conversion
from qwenmlx.errors import QwenMLXError
from qwenmlx.fidelity import compare_logits, compare_models
from tests.checkpoints import TINY_MOE, fp8_dequantize_blockwise, write_fp8_checkpoint

# The tiny models' expert down_proj has 32 inputs, so their affine recipes use groups of 32.
GROUP_SIZE = 32
# KL(unquantized || quantized) of next-token distributions over the test prompt, per recipe: about
# twice what each measures on the tiny random MoE (whose 64-wide layers quantize worse than real ones).
MAX_KL = {"q8": 0.01, "q6": 0.1, "q4": 0.3, "experts-6": 0.02, "experts-4": 0.07, "mixed-4-6": 0.3,
          "mxfp8": 0.1, "mxfp4": 0.5}
FP8_BLOCK = (24, 24)  # smaller than Qwen's 128 so each tiny tensor spans several tiles, ragged at the edges


def prompt_tokens(length: int = 40, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 151_000, length).tolist()


def logits(model, tokens: list[int]) -> mx.array:
    return model(mx.array([tokens]))[0].astype(mx.float32)


@pytest.fixture(scope="module")
def source(checkpoint_dir) -> Path:
    return checkpoint_dir("moe", torch.bfloat16)


@pytest.fixture(scope="module")
def reference_logits(source) -> mx.array:
    model, _ = load_model(source)
    return logits(model, prompt_tokens())


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """A function: the source converted with a recipe (None: unquantized), written once per recipe."""
    written = {}

    def get(recipe_name):
        if recipe_name not in written:
            dst = tmp_path_factory.mktemp("converted") / str(recipe_name)
            recipe = get_recipe(recipe_name, GROUP_SIZE) if recipe_name else None
            convert(source, dst, recipe)
            written[recipe_name] = dst
        return written[recipe_name]

    return get


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory) -> Path:
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8"), TINY_MOE, FP8_BLOCK)


def stored(model_dir: Path) -> dict[str, dict]:
    """Every saved tensor's header entry (dtype, shape), across shards."""
    entries = {}
    for f in weight_files(model_dir):
        entries.update({k: v for k, v in safetensors_header(f).items() if k != "__metadata__"})
    return entries


def mlx_lm_logits(model_dir: Path, tokens: list[int]) -> mx.array:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_dir))
    model.set_dtype(mx.float32)  # MLX's CPU expert matmul takes float32 only
    assert tokenizer.encode("hello") == [14990]
    return logits(model, tokens)


def test_unquantized_conversion_keeps_every_bf16_weight(source, converted, reference_logits):
    model, _ = load_model(converted(None))
    np.testing.assert_array_equal(np.array(logits(model, prompt_tokens())), np.array(reference_logits))
    config = json.loads((converted(None) / "config.json").read_text())
    assert "quantization" not in config


@pytest.mark.parametrize("recipe", list(BUILTIN_RECIPES))
def test_quantized_model_reads_in_qwenmlx_and_mlx_lm_within_the_recipe_tolerance(converted, reference_logits,
                                                                                   recipe):
    model_dir = converted(recipe)
    model, _ = load_model(model_dir)
    ours = logits(model, prompt_tokens())
    assert compare_logits(reference_logits, ours)["kl_divergence"] < MAX_KL[recipe]
    np.testing.assert_allclose(np.array(mlx_lm_logits(model_dir, prompt_tokens())), np.array(ours),
                               atol=1e-4, rtol=0)


def test_more_bits_give_lower_kl(converted, reference_logits):
    kl = {}
    for recipe in ("q4", "q6", "q8"):
        model, _ = load_model(converted(recipe))
        kl[recipe] = compare_logits(reference_logits, logits(model, prompt_tokens()))["kl_divergence"]
    assert kl["q8"] < kl["q6"] < kl["q4"]


@pytest.mark.parametrize("recipe", list(BUILTIN_RECIPES))
def test_each_recipe_stores_the_bits_it_claims(source, converted, recipe):
    model_dir = converted(recipe)
    tensors = stored(model_dir)
    section = json.loads((model_dir / "config.json").read_text())["quantization"]
    assert section["group_size"] and section["bits"]
    plan = plan_conversion(source, None)
    claimed = get_recipe(recipe, GROUP_SIZE)
    for step in plan.steps:
        name, shape = step.weight.name, step.weight.shape
        module = name.removesuffix(".weight")
        params = claimed.params_for(module, 3) if conversion.is_quantizable(step.weight) else None
        if params is None:
            assert tensors[name]["dtype"] == "BF16" and tuple(tensors[name]["shape"]) == shape
            assert f"{module}.scales" not in tensors
            assert section.get(module, False) is False or not conversion.is_quantizable(step.weight)
            continue
        in_dims = shape[-1]
        assert tensors[name]["dtype"] == "U32"
        assert tensors[name]["shape"][-1] * 32 // in_dims == params.bits
        assert in_dims // tensors[f"{module}.scales"]["shape"][-1] == params.group_size
        assert tensors[f"{module}.scales"]["dtype"] == ("BF16" if params.mode == "affine" else "U8")
        assert (f"{module}.biases" in tensors) == (params.mode == "affine")
        entry = section.get(module, {k: section[k] for k in ("bits", "group_size", "mode")})
        assert entry == params.as_config()
        if module.endswith("mlp.gate"):
            assert params.bits >= 8


def test_recipes_put_experts_and_the_rest_where_the_issue_says():
    for bits in (4, 6):
        recipe = get_recipe(f"experts-{bits}", GROUP_SIZE)
        assert recipe.params_for("model.layers.0.mlp.switch_mlp.up_proj", 3).bits == bits
        assert recipe.params_for("model.layers.0.self_attn.q_proj", 3).bits == 8
        assert recipe.params_for("model.embed_tokens", 3).bits == 8
        assert recipe.params_for("lm_head", 3).bits == 8
        assert recipe.params_for("model.layers.0.mlp.gate", 3) is None
    mixed = get_recipe("mixed-4-6")
    assert mixed.params_for("model.layers.0.self_attn.v_proj", 48).bits == 6
    assert mixed.params_for("model.layers.47.mlp.switch_mlp.down_proj", 48).bits == 6
    assert mixed.params_for("model.layers.20.self_attn.v_proj", 48).bits == 6  # (20 - 48 // 8) % 3 == 2
    assert mixed.params_for("model.layers.21.self_attn.v_proj", 48).bits == 4
    assert mixed.params_for("model.layers.20.self_attn.q_proj", 48).bits == 4
    assert mixed.params_for("model.layers.20.mlp.gate", 48) == QuantParams(8, 64)


def test_files_are_bit_identical_to_mlx_lm_quantize(converted):
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model

    # mlx-lm reads the unquantized conversion (the source's bf16 weights, stacked) and quantizes it in memory.
    model, config = mlx_lm_load_model(converted(None), lazy=True)
    quantize_model(model, config, GROUP_SIZE, 4, quant_predicate=model.quant_predicate)
    ours = {}
    for f in weight_files(converted("q4")):
        ours.update(mx.load(str(f)))
    theirs = dict(tree_flatten(model.parameters()))
    assert set(ours) == set(theirs)
    for name, array in theirs.items():
        assert ours[name].dtype == array.dtype, name
        assert mx.array_equal(ours[name], array).item(), name


def test_small_blocks_and_shards_write_the_same_tensors(source, converted, tmp_path, monkeypatch):
    monkeypatch.setattr(conversion, "BLOCK_BYTES", 4 * 64 * 1000)  # 1000-row blocks of the embeddings
    report = convert(source, tmp_path / "out", get_recipe("q4", GROUP_SIZE), max_shard_bytes=2_000_000)
    assert report.shards > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    for f in weight_files(tmp_path / "out"):
        modules = {name.rsplit(".", 1)[0] for name, shard in index.items() if shard == f.name}
        if len(modules) > 1:  # a tensor larger than the limit gets a shard of its own, as in mlx-lm
            assert f.stat().st_size < 2_000_000 + 100_000  # the limit plus the header
    reference = {}
    for f in weight_files(converted("q4")):
        reference.update(mx.load(str(f)))
    for f in weight_files(tmp_path / "out"):
        for name, array in mx.load(str(f)).items():
            assert mx.array_equal(array, reference.pop(name)).item(), name
    assert not reference


def test_output_dir_carries_tokenizer_generation_config_and_chat_template(source, converted):
    model_dir = converted("q4")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (model_dir / name).read_bytes() == (source / name).read_bytes()
    assert "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def fp8_converted(fp8_source, tmp_path_factory) -> Path:
    """The FP8 checkpoint dequantized to bf16, read in 48-row blocks: two FP8 tile rows each."""
    dst = tmp_path_factory.mktemp("fp8-converted") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(conversion, "BLOCK_BYTES", 4 * 64 * 48)
        convert(fp8_source, dst)
    return dst


def test_fp8_checkpoint_is_dequantized_block_by_block(fp8_source, fp8_converted):
    ours = {}
    for f in weight_files(fp8_converted):
        ours.update(mx.load(str(f)))
    saved = load_file(fp8_source / "model.safetensors")
    for name in [n for n in saved if n.endswith("_scale_inv")]:
        weight = name.removesuffix("_scale_inv")
        expected = fp8_dequantize_blockwise(saved[weight], saved[name], FP8_BLOCK).to(torch.bfloat16).float()
        if ".experts." in weight:
            prefix, rest = weight.split(".experts.")
            expert, proj = rest.split(".", 1)
            actual = ours[f"{prefix}.switch_mlp.{proj}"][int(expert)]
        else:
            actual = ours[weight]
        assert actual.dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(actual.astype(mx.float32)), expected.numpy(), err_msg=weight)


def test_fp8_checkpoint_quantizes_like_its_dequantized_weights(fp8_source, fp8_converted, reference_logits,
                                                                tmp_path):
    # FP8 itself (3 mantissa bits) costs about what 6-bit affine does on the tiny model.
    dequantized, _ = load_model(fp8_converted)
    fp8_logits = logits(dequantized, prompt_tokens())
    assert compare_logits(reference_logits, fp8_logits)["kl_divergence"] < MAX_KL["q6"]
    convert(fp8_source, tmp_path / "out", get_recipe("q8", GROUP_SIZE))
    model, _ = load_model(tmp_path / "out")
    assert compare_logits(fp8_logits, logits(model, prompt_tokens()))["kl_divergence"] < MAX_KL["q8"]
    np.testing.assert_allclose(np.array(mlx_lm_logits(tmp_path / "out", prompt_tokens())),
                               np.array(logits(model, prompt_tokens())), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["dense", "moe-gqa-4to1-tied"])
def test_dense_and_tied_models_convert(checkpoint_dir, variant, tmp_path):
    src = checkpoint_dir(variant)
    convert(src, tmp_path / "out", get_recipe("experts-4", GROUP_SIZE))
    reference, _ = load_model(src)
    model, _ = load_model(tmp_path / "out")
    kl = compare_logits(logits(reference, prompt_tokens()), logits(model, prompt_tokens()))["kl_divergence"]
    assert kl < MAX_KL["experts-4"]
    np.testing.assert_allclose(np.array(mlx_lm_logits(tmp_path / "out", prompt_tokens())),
                               np.array(logits(model, prompt_tokens())), atol=1e-4, rtol=0)


def test_an_exception_midway_leaves_no_destination(source, tmp_path, monkeypatch):
    calls = []

    def quantize_then_fail(w, params):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("injected")
        return conversion_quantize(w, params)

    conversion_quantize = conversion.quantize
    monkeypatch.setattr(conversion, "quantize", quantize_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        convert(source, tmp_path / "out", get_recipe("q4", GROUP_SIZE))
    assert len(calls) == 10
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_force_overwrite_keeps_the_old_destination(source, converted, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    shutil.copytree(converted("q8"), dst)
    before = sorted(p.name for p in dst.iterdir())

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "quantize", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, get_recipe("q4", GROUP_SIZE), force=True)
    assert sorted(p.name for p in dst.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_replaces_an_earlier_output_and_nothing_else(source, converted, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(converted("q8"), dst)
    with pytest.raises(QwenMLXError, match=r"holds an earlier qwenmlx output \(pass --force to replace it\)"):
        convert(source, dst, get_recipe("q4", GROUP_SIZE))
    convert(source, dst, get_recipe("q4", GROUP_SIZE), force=True)
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (dst / "old.txt").write_text("mine")
    with pytest.raises(QwenMLXError, match="holds old.txt, which qwenmlx did not write"):
        convert(source, dst, get_recipe("q8", GROUP_SIZE), force=True)
    assert (dst / "old.txt").read_text() == "mine"


def test_empty_destination_dir_is_used(source, tmp_path):
    (tmp_path / "out").mkdir()
    convert(source, tmp_path / "out", get_recipe("q8", GROUP_SIZE))
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage header"])
def test_corrupt_input_shard_is_a_clear_error_naming_it(source, tmp_path, damage):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    shard = weight_files(src)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(QwenMLXError, match=shard.name):
        convert(src, tmp_path / "out", get_recipe("q4", GROUP_SIZE))
    assert not (tmp_path / "out").exists()


def test_not_enough_disk_space_is_refused_with_the_amount_needed(source, tmp_path, monkeypatch):
    monkeypatch.setattr(conversion.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(QwenMLXError, match=r"needs 0\.01 GB, 0\.00 GB free"):
        convert(source, tmp_path / "out", get_recipe("q4", GROUP_SIZE))
    assert not (tmp_path / "out").exists()


def test_a_disk_space_refusal_prints_enough_digits_to_tell_the_amounts_apart(source, tmp_path, monkeypatch):
    needed = plan_conversion(source, get_recipe("q4", GROUP_SIZE)).total_bytes
    free = needed - 10**6
    monkeypatch.setattr(conversion.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, free))
    with pytest.raises(QwenMLXError) as refusal:
        convert(source, tmp_path / "out", get_recipe("q4", GROUP_SIZE))
    needs, has = re.search(r"needs (\S+) GB, (\S+) GB free", str(refusal.value)).groups()
    assert float(needs) > float(has)


@pytest.mark.parametrize("toml, message", [
    ('[default]\nbits = 4\ncolour = "red"\n', "unknown key 'colour'"),
    ("[default]\nbits = 7\n", "bits must be one of 2, 3, 4, 5, 6, 8"),
    ("[default]\nbits = 4\ngroup_size = 48\n", "group_size must be one of"),
    ('[default]\nbits = 4\nmode = "mxfp4"\ngroup_size = 64\n', "mode mxfp4 takes bits 4 and group_size 32"),
    ('[[rules]]\nbits = 4\n', "needs a pattern"),
    ('[[rules]]\npattern = "("\nbits = 4\n', "bad pattern"),
    ("[default\nbits = 4\n", "not valid TOML"),
])
def test_bad_recipe_file_is_a_clear_error(tmp_path, toml, message):
    path = tmp_path / "recipe.toml"
    path.write_text(toml)
    with pytest.raises(QwenMLXError, match=f"{path}.*{message}"):
        read_recipe_file(path)


def test_group_size_a_tensor_cannot_divide_is_refused_before_any_work(source, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text("[default]\nbits = 4\ngroup_size = 128\n")
    with pytest.raises(QwenMLXError, match="group size 128 does not divide its input dimension 64"):
        convert(source, tmp_path / "out", read_recipe_file(path))
    assert not (tmp_path / "out").exists()


def test_router_below_8_bits_is_refused(source, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[default]\nbits = 4\n[[rules]]\npattern = "mlp\\\\.gate$"\nbits = 4\n')
    with pytest.raises(QwenMLXError, match="router .* must stay at 8 bits"):
        plan_conversion(source, read_recipe_file(path))


def test_user_recipe_file_quantizes_as_written(source, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[default]\nbits = 5\ngroup_size = 32\n'
                    '[[rules]]\npattern = "switch_mlp"\nbits = 3\ngroup_size = 32\n'
                    '[[rules]]\npattern = "v_proj$"\nlayers = [0]\nkeep = true\n')
    convert(source, tmp_path / "out", read_recipe_file(path))
    tensors = stored(tmp_path / "out")
    section = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert tensors["model.layers.1.mlp.switch_mlp.up_proj.weight"]["shape"] == [8, 32, 64 * 3 // 32]
    assert tensors["model.layers.0.self_attn.v_proj.weight"]["dtype"] == "BF16"
    assert section["model.layers.0.self_attn.v_proj"] is False
    assert section["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    load_model(tmp_path / "out")


def test_quantize_refuses_a_quantized_model_unless_asked_to_dequantize(source, converted, tmp_path):
    with pytest.raises(QwenMLXError, match="already quantized; pass --dequantize"):
        convert(converted("q8"), tmp_path / "out", get_recipe("q4", GROUP_SIZE))
    convert(converted("q8"), tmp_path / "out", get_recipe("q4", GROUP_SIZE), dequantize=True)
    assert compare_models(source, tmp_path / "out", prompt_tokens())["kl_divergence"] < MAX_KL["q4"]


def test_quantizing_an_unquantized_mlx_dir_equals_converting_directly(converted, tmp_path):
    convert(converted(None), tmp_path / "out", get_recipe("q4", GROUP_SIZE))
    ours, direct = {}, {}
    for f in weight_files(tmp_path / "out"):
        ours.update(mx.load(str(f)))
    for f in weight_files(converted("q4")):
        direct.update(mx.load(str(f)))
    assert set(ours) == set(direct)
    assert all(mx.array_equal(ours[k], direct[k]).item() for k in ours)


def test_plan_size_is_the_size_written(source, converted):
    facts = memory_plan(plan_conversion(source, get_recipe("experts-4", GROUP_SIZE)), context=4096)
    written = sum(math.prod(t["shape"]) * {"U32": 4, "BF16": 2, "U8": 1}[t["dtype"]]
                  for t in stored(converted("experts-4")).values())
    assert facts["size_on_disk_gb"] == round(written / 1e9, 3)
    assert facts["memory_gb"] == round(facts["size_on_disk_gb"] + facts["kv_cache_gb"], 3)


def test_kv_cache_of_qwen3_30b_a3b_at_32k_tokens():
    config = config_from_dict(json.loads(Path("tests/fixtures/config-Qwen3-30B-A3B.json").read_text()))
    # 48 layers x (K and V) x 4 KV heads x 128 dims x 32768 tokens, 2 bytes each in bf16.
    assert kv_cache_bytes(kv_elements_per_token(config), 32768) == 48 * 2 * 4 * 128 * 32768 * 2
    # 8-bit: 1 byte a value plus a bf16 scale and bias per 64 values.
    assert kv_cache_bytes(kv_elements_per_token(config), 32768, bits=8) == 48 * 2 * 4 * 128 * 32768 * (1 + 4 / 64)


def test_fidelity_report_has_a_relative_error_per_quantized_kind(source, tmp_path):
    report = convert(source, tmp_path / "out", get_recipe("experts-4", GROUP_SIZE))
    kinds = {k.kind: k for k in report.kinds}
    assert kinds["mlp.gate"].relative_error is None and kinds["norms"].relative_error is None
    assert 0.05 < kinds["mlp.switch_mlp.up_proj"].relative_error < 0.15  # 4 bits: ~1/16 of the range
    assert kinds["self_attn.q_proj"].relative_error < 0.01  # 8 bits
    assert kinds["mlp.switch_mlp.up_proj"].bits_per_weight == 4 + 2 * 16 / GROUP_SIZE


def test_cli_convert_prints_json_report_and_check(source, tmp_path):
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "out"), "--bits", "8",
                                      "--group-size", "32", "--check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"] == "q8" and report["check"]["top1_agreement"] > 0.8
    assert report["bits_per_weight"] == pytest.approx(9.0, abs=0.01)


def test_cli_plan_writes_nothing(source, tmp_path):
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "out"), "--recipe", "experts-4",
                                      "--group-size", "32", "--plan", "--context", "1000", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["context"] == 1000
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(source, converted, tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(converted("q8")), str(tmp_path / "out"), "--recipe", "q4",
                                      "--group-size", "32"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "already quantized" in result.output
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "out"), "--recipe", "q4", "--bits", "4"])
    assert result.exit_code == 1 and "not both" in result.output
