"""`qwenmlx pull` (and `convert REPO_ID`) against a mock of the Hub, the models directory, the default model.

The repo is a synthetic Qwen3-MoE served on the fly (tests/synthetic_checkpoint.py) in shards laid out as
the Hub's: in the model's order, each layer's experts spanning two of them. The CLI runs in a child process
with HF_ENDPOINT, HF_HOME and QWENMLX_HOME set, as a user runs it; the tests that need to look inside a
pull (disk at each step, an interruption) call the library in this process, with huggingface_hub's
settings patched to the same effect.
"""

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from quantize import get_recipe
from qwenmlx.cli import app
from qwenmlx.convert import convert, memory_plan, plan_conversion
from qwenmlx.destinations import MANIFEST
from qwenmlx.errors import QwenMLXError
from qwenmlx.hub import MARKER, PullProgress, find_model, list_models, models_dir, pull, remove
from tests.checkpoints import TINY_MOE, write_fp8_checkpoint, write_hf_checkpoint
from tests.mock_hub import BytesFile, MockHub, Repo
from tests.synthetic_checkpoint import synthetic_repo

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# Qwen3-30B-A3B's config at a size that converts in a second; every dimension a multiple of 64 (experts-4's groups).
TINY = dict(json.loads((FIXTURES / "config-Qwen3-30B-A3B.json").read_text()), hidden_size=128, num_hidden_layers=3,
            num_experts=16, moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=2048, intermediate_size=256)
# A layer's experts (786 KB) span two input shards, never three: as on the Hub (1.2 GB of experts, 4 GB shards).
INPUT_SHARD_BYTES = 900_000
OUTPUT_SHARD_BYTES = 600_000  # for the library tests: 3 output shards, the first the only one to read input shard 1
SIDE_FILES = [FIXTURES / "generation_config.json", FIXTURES / "tokenizer_config.json", FIXTURES / "chat_template.jinja"]


@pytest.fixture(scope="module")
def repo() -> Repo:
    return synthetic_repo(TINY, INPUT_SHARD_BYTES, SIDE_FILES)


@pytest.fixture(scope="module")
def local_copy(repo, tmp_path_factory) -> Path:
    """The same repo as a directory (what `hf download` gives)."""
    return repo.write_to(tmp_path_factory.mktemp("Qwen--Tiny"))


@pytest.fixture(scope="module")
def reference(local_copy, tmp_path_factory):
    """convert's output from the local copy, experts-4, with a shard size (written once per size)."""
    written = {}

    def get(max_shard_bytes: int = 5 * 10**9) -> Path:
        if max_shard_bytes not in written:
            dst = tmp_path_factory.mktemp("reference") / "out"
            convert(local_copy, dst, get_recipe("experts-4"), max_shard_bytes=max_shard_bytes)
            written[max_shard_bytes] = dst
        return written[max_shard_bytes]

    return get


@pytest.fixture(scope="module")
def hub(repo):
    with MockHub({"Qwen/Tiny": repo}) as hub:
        yield hub


@pytest.fixture
def env(hub, tmp_path) -> dict:
    """A user's environment pointing at the mock: its URL, an empty Hugging Face cache, an empty qwenmlx home."""
    return dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), QWENMLX_HOME=str(tmp_path / "home"),
                PYTHONPATH=str(ROOT), HF_HUB_DISABLE_PROGRESS_BARS="1")


@pytest.fixture
def in_process(hub, tmp_path, monkeypatch) -> Path:
    """The same for calls in this process: huggingface_hub reads its settings at import, so they are patched."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("QWENMLX_HOME", str(tmp_path / "home"))
    hub.requests.clear()
    return tmp_path


def qwenmlx(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenmlx", *args], env=env, cwd=ROOT, capture_output=True, text=True)


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, the pull's hidden marker left out."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name not in (MARKER, MANIFEST)}


def weights_in(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.safetensors"))


def shard_files(steps) -> set[str]:
    """The input shards some step of these reads."""
    return {f.name for step in steps for f in step.weight.files}


def test_pull_writes_what_convert_writes_from_the_same_files(env, tmp_path, reference):
    result = qwenmlx(env, "pull", "Qwen/Tiny")
    assert result.returncode == 0, result.stderr
    dst = tmp_path / "home" / "models" / "Tiny-experts-4"
    assert files_of(dst) == files_of(reference())
    assert json.loads((dst / MARKER).read_text())["repo_id"] == "Qwen/Tiny"
    assert [p.name for p in dst.parent.iterdir()] == ["Tiny-experts-4"]  # no partial dir left
    assert weights_in(tmp_path / "hf") == []  # the small files may stay in the Hugging Face cache, no shard
    assert (tmp_path / "hf" / "hub").is_dir()  # HF_HOME was honoured


def test_convert_of_a_repo_id_streams_as_pull_does(env, hub, tmp_path, local_copy, reference):
    hub.requests.clear()
    plan = qwenmlx(env, "convert", "Qwen/Tiny", str(tmp_path / "out"), "--recipe", "experts-4", "--plan", "--json")
    assert plan.returncode == 0, plan.stderr
    assert [f for f in hub.downloads() if f.endswith(".safetensors")] == []
    assert json.loads(plan.stdout) == memory_plan(plan_conversion(local_copy, get_recipe("experts-4")), 32768)
    result = qwenmlx(env, "convert", "Qwen/Tiny", str(tmp_path / "out"), "--recipe", "experts-4", "--json")
    assert result.returncode == 0, result.stderr
    assert files_of(tmp_path / "out") == files_of(reference())
    assert weights_in(tmp_path / "hf") == []


class DiskSampler(PullProgress):
    """The bytes under a directory each time a chunk is downloaded and each time an output tensor is finished."""

    def __init__(self, root: Path):
        self.root, self.peak = root, 0

    def sample(self, *_) -> None:
        self.peak = max(self.peak, sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()))

    downloaded = written = sample


def test_peak_disk_is_the_output_plus_two_input_shards(in_process, repo, reference):
    shards = [f.size for name, f in repo.files.items() if name.endswith(".safetensors")]
    small_files = sum(f.size for name, f in repo.files.items() if not name.endswith(".safetensors"))
    output = sum(p.stat().st_size for p in reference(OUTPUT_SHARD_BYTES).iterdir())
    bound = output + 2 * max(shards) + small_files
    assert output + sum(shards) > bound  # so keeping every input shard would fail this test
    sampler = DiskSampler(in_process)
    pull("Qwen/Tiny", in_process / "out", max_shard_bytes=OUTPUT_SHARD_BYTES, progress=sampler)
    assert files_of(in_process / "out") == files_of(reference(OUTPUT_SHARD_BYTES))
    assert output < sampler.peak <= bound


def test_an_interrupted_pull_resumes_without_downloading_finished_parts(in_process, hub, local_copy, reference):
    plan = plan_conversion(local_copy, get_recipe("experts-4"), max_shard_bytes=OUTPUT_SHARD_BYTES)
    assert len(plan.shards) >= 3

    class CtrlCInSecondShard(PullProgress):
        def written(self, tensors: int) -> None:
            if tensors > len(plan.shards[0]):
                raise KeyboardInterrupt

    dst = in_process / "out"
    with pytest.raises(KeyboardInterrupt):
        pull("Qwen/Tiny", dst, max_shard_bytes=OUTPUT_SHARD_BYTES, progress=CtrlCInSecondShard())
    partial = in_process / ".out.pulling"
    assert not dst.exists()
    assert sorted(p.name for p in partial.iterdir()) == sorted([MARKER, plan.shard_name(0)])  # no input shard kept
    first_only = shard_files(plan.shards[0]) - shard_files([s for shard in plan.shards[1:] for s in shard])
    assert first_only <= set(hub.downloads())

    hub.requests.clear()
    report = pull("Qwen/Tiny", dst, max_shard_bytes=OUTPUT_SHARD_BYTES)
    assert report.kept_shards == 1
    assert set(hub.downloads()) == shard_files([s for shard in plan.shards[1:] for s in shard])
    assert first_only and not first_only & set(hub.downloads())
    assert files_of(dst) == files_of(reference(OUTPUT_SHARD_BYTES))
    assert not partial.exists()


@pytest.mark.parametrize("offline", [False, True])
def test_shards_in_the_hugging_face_cache_are_read_there_and_left_there(in_process, hub, monkeypatch, reference,
                                                                         offline):
    from huggingface_hub import constants, snapshot_download

    cached = weights_in(Path(snapshot_download("Qwen/Tiny")))
    before = {p: p.stat().st_mtime_ns for p in cached}
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    pull("Qwen/Tiny", in_process / "out")
    assert (hub.requests if offline else hub.downloads()) == []  # offline: not even a request
    assert files_of(in_process / "out") == files_of(reference())
    assert {p: p.stat().st_mtime_ns for p in cached} == before


def test_a_pull_with_other_arguments_starts_afresh(in_process, local_copy):
    dst = in_process / "out"
    partial = in_process / ".out.pulling"
    partial.mkdir()
    (partial / MARKER).write_text(json.dumps({"repo_id": "Qwen/Tiny", "recipe": "q8"}))
    (partial / "model-00001-of-00009.safetensors").write_bytes(b"from another recipe")
    pull("Qwen/Tiny", dst)
    assert not partial.exists()
    assert (dst / "model.safetensors").is_file() and not (dst / "model-00001-of-00009.safetensors").exists()


def test_a_directory_in_the_way_of_the_partial_one_is_left_alone(in_process):
    partial = in_process / ".out.pulling"
    partial.mkdir()
    (partial / "mine.txt").write_text("not qwenmlx's")
    with pytest.raises(QwenMLXError, match="not written by qwenmlx pull"):
        pull("Qwen/Tiny", in_process / "out")
    assert [p.name for p in partial.iterdir()] == ["mine.txt"]


def test_two_pulls_into_the_same_place_do_not_mix(in_process):
    partial = in_process / ".out.pulling"
    partial.mkdir()
    held = os.open(partial, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the first pull holds it
        with pytest.raises(QwenMLXError, match="another qwenmlx pull is writing there"):
            pull("Qwen/Tiny", in_process / "out")
    finally:
        os.close(held)
    pull("Qwen/Tiny", in_process / "out")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failure, says", [
    ("no such repo", "Qwen/Nope: no such model on http://127.0.0.1:"),
    ("connection refused", "cannot reach http://127.0.0.1:"),
    ("cut-short download", "Qwen/Tiny/model-00001-of-00005.safetensors: download cut short (got 1,000 of "),
    ("not safetensors", "Qwen/Broken: Failed to parse safetensors header for 'model.safetensors'"),
    ("offline, not cached", "Qwen/Tiny: not in the local Hugging Face cache, and HF_HUB_OFFLINE forbids"),
])
def test_hub_failures_are_one_line_errors_that_leave_nothing_behind(env, hub, tmp_path, failure, says):
    repo_id = {"no such repo": "Qwen/Nope", "not safetensors": "Qwen/Broken"}.get(failure, "Qwen/Tiny")
    hub.repos["Qwen/Broken"] = Repo({"config.json": BytesFile(json.dumps(TINY).encode()),
                                     "model.safetensors": BytesFile(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")})
    if failure == "connection refused":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    if failure == "offline, not cached":
        env["HF_HUB_OFFLINE"] = "1"
    if failure == "cut-short download":
        hub.cut_short["model-00001-of-00005.safetensors"] = 1000
    try:
        result = qwenmlx(env, "pull", repo_id)
    finally:
        hub.cut_short.clear()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    models = tmp_path / "home" / "models"
    assert not models.exists() or list(models.iterdir()) == []
    assert weights_in(tmp_path) == [] and list(tmp_path.rglob("*.incomplete")) == []


def test_fp8_repo_pulls_as_its_local_conversion(env, hub, tmp_path):
    source = write_fp8_checkpoint(tmp_path / "fp8", TINY_MOE, (24, 24))
    hub.repos["Qwen/Tiny-FP8"] = Repo.from_dir(source)
    result = qwenmlx(env, "pull", "Qwen/Tiny-FP8", str(tmp_path / "pulled"), "--group-size", "32")
    assert result.returncode == 0, result.stderr
    convert(source, tmp_path / "converted", get_recipe("experts-4", 32))
    assert files_of(tmp_path / "pulled") == files_of(tmp_path / "converted")


def test_mlx_repo_is_downloaded_as_it_is(env, hub, tmp_path, reference):
    hub.repos["mlx-community/Tiny-4bit"] = Repo.from_dir(reference())
    refused = qwenmlx(env, "pull", "mlx-community/Tiny-4bit", "--recipe", "q4")
    assert refused.returncode == 1 and "already an MLX model" in refused.stderr
    result = qwenmlx(env, "pull", "mlx-community/Tiny-4bit")
    assert result.returncode == 0, result.stderr
    dst = tmp_path / "home" / "models" / "Tiny-4bit"
    assert files_of(dst) == files_of(reference())
    assert sorted(p.name for p in dst.iterdir() if p.name.startswith(".")) == sorted([MANIFEST, MARKER])


# --- the models directory ---


def test_list_shows_each_pulled_model_with_recipe_size_and_context(in_process):
    pull("Qwen/Tiny")
    (models_dir() / "not-a-model").mkdir()
    [entry] = list_models()
    assert (entry.name, entry.repo_id, entry.recipe, entry.context) == ("Tiny-experts-4", "Qwen/Tiny", "experts-4",
                                                                        32768)
    assert entry.size_bytes == sum(p.stat().st_size for p in entry.path.glob("*.safetensors"))
    listed = json.loads(CliRunner().invoke(app, ["list", "--json"]).stdout)
    assert listed == [entry.as_dict()]
    assert find_model("Tiny-experts-4") == entry.path  # what -m takes


def test_rm_removes_a_pulled_model_and_its_unfinished_pull(in_process):
    pull("Qwen/Tiny")
    partial = models_dir() / ".Tiny-experts-4.pulling"
    partial.mkdir()
    (partial / MARKER).write_text("{}")
    result = CliRunner().invoke(app, ["rm", "Tiny-experts-4"])
    assert result.exit_code == 0, result.output
    assert list(models_dir().iterdir()) == []


@pytest.mark.parametrize("name", ["..", ".", "../outside", "/tmp", "a/b", ".hidden", "", "linked", "hand-made"])
def test_rm_touches_nothing_it_did_not_pull_however_the_name_is_spelled(in_process, name):
    outside = in_process / "outside"
    outside.mkdir()
    (outside / MARKER).write_text("{}")  # even a marker does not make a directory outside the models dir fair game
    models_dir().mkdir(parents=True)
    (models_dir() / "linked").symlink_to(outside)
    (models_dir() / "hand-made").mkdir()
    (models_dir() / "hand-made" / "config.json").write_text("{}")
    before = sorted(str(p) for p in in_process.rglob("*"))
    with pytest.raises(QwenMLXError):
        remove(name)
    assert sorted(str(p) for p in in_process.rglob("*")) == before


# --- the default model ---


def test_chat_without_a_model_or_a_terminal_says_to_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENMLX_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["chat"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "`qwenmlx pull`" in lines[0] and "Qwen/Qwen3-30B-A3B (61 GB)" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def default_repo(tmp_path_factory) -> Repo:
    """A tiny working Qwen3-MoE (real tokenizer) that experts-4's 64-wide groups fit, served as the default repo."""
    source = write_hf_checkpoint(tmp_path_factory.mktemp("default"), dict(TINY_MOE, moe_intermediate_size=64))
    shutil.copy(FIXTURES / "chat_template.jinja", source)
    return Repo.from_dir(source)


def test_first_chat_on_a_terminal_offers_the_pull_then_chats_and_generate_uses_it(env, hub, default_repo, tmp_path):
    hub.repos["Qwen/Qwen3-30B-A3B"] = default_repo
    chat = pexpect.spawn(sys.executable, ["-m", "qwenmlx", "chat", "--temp", "0", "--max-tokens", "4"], env=env,
                         cwd=str(ROOT), encoding="utf-8", timeout=60, dimensions=(40, 200))
    chat.expect_exact("download Qwen/Qwen3-30B-A3B (61 GB) and convert it to experts-4 (18 GB)? [y/N]")
    chat.sendline("y")
    chat.expect_exact(">>> ")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    assert (tmp_path / "home" / "models" / "Qwen3-30B-A3B-experts-4" / MARKER).is_file()
    result = qwenmlx(env, "generate", "-p", "Hi", "--max-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generated_tokens"] == 3
    described = qwenmlx(env, "info", "Qwen3-30B-A3B-experts-4", "--json")
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["path"] == str(tmp_path / "home" / "models" / "Qwen3-30B-A3B-experts-4")
