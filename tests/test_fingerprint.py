"""model_fingerprint: one string naming a checkpoint, the same wherever it is stored, other for other weights."""

import json
import shutil

import pytest

from qwenmlx.checkpoint import load_model, model_fingerprint
from qwenmlx.errors import QwenMLXError


def test_the_same_checkpoint_copied_elsewhere_has_the_same_fingerprint(moe_dir, tmp_path):
    copy = shutil.copytree(moe_dir, tmp_path / "elsewhere")
    assert model_fingerprint(copy) == model_fingerprint(moe_dir)


def test_other_weights_with_identical_headers_have_another_fingerprint(moe_dir, moe_dir_other_weights):
    assert model_fingerprint(moe_dir_other_weights) != model_fingerprint(moe_dir)


def test_another_config_has_another_fingerprint(moe_dir, tmp_path):
    copy = shutil.copytree(moe_dir, tmp_path / "yarn")
    config = json.loads((copy / "config.json").read_text())
    config["rope_theta"] = 10_000.0
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) != model_fingerprint(moe_dir)


def test_a_loaded_model_carries_the_fingerprint_of_its_directory(moe_dir):
    assert load_model(moe_dir)[0].fingerprint == model_fingerprint(moe_dir)


def test_a_directory_without_a_checkpoint_names_what_is_missing(tmp_path):
    with pytest.raises(QwenMLXError, match="config.json: cannot read"):
        model_fingerprint(tmp_path)
