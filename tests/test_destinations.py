"""What a command may write and replace, however its paths are spelled, and what killed runs leave behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenmlx.bench import check_results_file
from qwenmlx.cli import app
from qwenmlx.destinations import (
    MANIFEST,
    check_apart,
    check_output_file,
    new_directory,
    prepare_directory,
    remove_output,
    write_text_atomically,
    written_files,
)
from tests.errors import one_line_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """tmp/src (the source), tmp/link -> src, tmp/sub (the working directory), tmp/elsewhere/up -> tmp, HOME = tmp."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "src")
    (tmp_path / "sub").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "up").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def files_below(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def output(tmp_path: Path, files: dict[str, str]) -> Path:
    """A directory written by qwenmlx holding files."""
    dst = tmp_path / "out"
    with new_directory(dst) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
    return dst


@pytest.mark.parametrize("spelling", ["{tmp}/src", "{tmp}/src/", "{tmp}/src/.", "{tmp}/sub/../src",
                                      "{tmp}/src/missing/..", "{tmp}/link", "{tmp}/link/", "../src", "../link/",
                                      "./../src/.", "~/src", "{tmp}/elsewhere/up/src"])
def test_an_output_that_is_its_source_is_refused_however_spelled(tree, spelling):
    dst = spelling.format(tmp=tree)
    message = one_line_error(lambda: prepare_directory(dst, inputs={"source": tree / "src"}, force=True))
    assert message == f"{dst}: is the source {tree / 'src'}; write to another path"
    assert files_below(tree / "src") == {"config.json": b"{}"}


def test_a_source_spelled_through_a_link_is_still_the_source(tree):
    message = one_line_error(lambda: check_apart("../src", {"source": tree / "link/"}))
    assert "is the source" in message


@pytest.mark.parametrize("spelling", ["{tmp}", "{tmp}/", "..", "../sub/..", "{tmp}/link/..", "{tmp}/elsewhere/up",
                                      "~", "/"])
def test_an_output_holding_its_source_is_refused(tree, spelling):
    dst = spelling.format(tmp=tree)
    message = one_line_error(lambda: prepare_directory(dst, inputs={"source": tree / "src"}, force=True))
    assert message == f"{dst}: contains the source {tree / 'src'}; write to another path"
    assert (tree / "src" / "config.json").exists()


@pytest.mark.parametrize("spelling", ["{tmp}/src/out", "{tmp}/link/out/", "../src/a/b", "{tmp}/elsewhere/up/src/out"])
def test_an_output_inside_its_source_is_refused(tree, spelling):
    dst = spelling.format(tmp=tree)
    message = one_line_error(lambda: prepare_directory(dst, inputs={"source": tree / "src"}))
    assert message == f"{dst}: is inside the source {tree / 'src'}; write to another path"
    assert files_below(tree / "src") == {"config.json": b"{}"}


def test_an_output_beside_its_source_is_allowed(tree):
    assert prepare_directory("../src-q4", inputs={"source": tree / "link"}) == tree / "src-q4"


def plain_directory(path: Path) -> None:
    (path / "holiday").mkdir(parents=True)
    (path / "cat.jpg").write_bytes(b"\xff\xd8\xff")


def hugging_face_checkpoint(path: Path) -> None:
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")


def output_with(extra: str):
    def make(path: Path) -> None:
        with new_directory(path) as tmp:
            (tmp / "config.json").write_text("{}")
        if extra == "a file":
            (path / "notes.md").write_text("mine")
        elif extra == "a directory":
            (path / "notes.md").mkdir()
        elif extra == "a link in a file's place":
            (path / "config.json").unlink()
            (path / "config.json").symlink_to(path.parent / "precious.txt")
        else:
            manifest = json.loads((path / MANIFEST).read_text())
            (path / MANIFEST).write_text(json.dumps({**manifest, "files": None}))

    return make


def a_file(path: Path) -> None:
    path.write_text("mine")


@pytest.mark.parametrize("make, says", [
    (plain_directory, "not a directory qwenmlx wrote (it holds cat.jpg and no finished .qwenmlx.json)"),
    (hugging_face_checkpoint, "not a directory qwenmlx wrote (it holds config.json and no finished .qwenmlx.json)"),
    (output_with("a file"), "holds notes.md, which qwenmlx did not write"),
    (output_with("a directory"), "holds notes.md, which qwenmlx did not write"),
    (output_with("a link in a file's place"), "holds config.json, which qwenmlx did not write"),
    (output_with("an unfinished manifest"), "no finished .qwenmlx.json"),
    (a_file, "exists and is not a directory"),
], ids=["plain directory", "Hugging Face checkpoint", "output plus a file", "output plus a directory",
        "output with a link", "unfinished output", "file"])
def test_force_replaces_nothing_qwenmlx_did_not_write(tmp_path, make, says):
    (tmp_path / "precious.txt").write_text("mine")
    make(tmp_path / "dst")
    before = files_below(tmp_path)
    message = one_line_error(lambda: prepare_directory(tmp_path / "dst", force=True))
    assert message.startswith(f"{tmp_path / 'dst'}: ") and says in message
    assert files_below(tmp_path) == before


def test_force_never_replaces_the_home_directory(tree):
    message = one_line_error(lambda: prepare_directory("~", force=True))
    assert message.startswith("~: not a directory qwenmlx wrote")


def test_an_earlier_output_is_replaced_only_with_force(tmp_path):
    dst = output(tmp_path, {"a.txt": "old"})
    assert "holds an earlier qwenmlx output (pass --force to replace it)" in one_line_error(
        lambda: prepare_directory(dst))
    with new_directory(prepare_directory(dst, force=True)) as tmp:
        (tmp / "b.txt").write_text("new")
    assert files_below(dst) == {MANIFEST: (dst / MANIFEST).read_bytes(), "b.txt": b"new"}
    assert written_files(dst) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_write_that_fails_leaves_nothing_and_keeps_the_earlier_output(tmp_path):
    dst = output(tmp_path, {"a.txt": "old"})
    before = files_below(tmp_path)
    with pytest.raises(RuntimeError, match="injected"), new_directory(prepare_directory(dst, force=True)) as tmp:
        (tmp / "b.txt").write_text("new")
        raise RuntimeError("injected")
    assert files_below(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_remove_output_deletes_only_an_output(tmp_path):
    hugging_face_checkpoint(tmp_path / "hf")
    one_line_error(remove_output, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    remove_output(output(tmp_path, {"a.txt": "old"}))
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


# --- what killed writers leave behind ---

WRITER = """
import os, sys
from pathlib import Path
from qwenmlx.destinations import new_directory
with new_directory(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(bytes(1000))
    print(tmp, flush=True)
    if sys.argv[2] == "exit":
        os._exit(0)  # ends at once, as after a SIGKILL: no cleanup runs
    sys.stdin.read()
"""


def start_writer(dst: Path, then: str) -> tuple[subprocess.Popen, Path]:
    """A process that is writing dst (as a conversion midway); then "exit" ends it there, "wait" keeps it alive."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(dst), then], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    partial = Path(child.stdout.readline().strip())
    assert partial.name == f".{dst.name}.partial-{child.pid}" and partial.is_dir()
    return child, partial


def test_a_partial_directory_of_a_process_that_exited_is_removed_with_a_note(tmp_path):
    child, partial = start_writer(tmp_path / "out", "exit")
    child.wait()
    notes = []
    prepare_directory(tmp_path / "other", on_note=notes.append)
    assert not partial.exists()
    assert notes == [f"removed {partial}: left by qwenmlx process {child.pid}, which ended before finishing"]


def test_a_live_writers_partial_directory_is_kept_until_the_writer_is_killed(tmp_path):
    child, partial = start_writer(tmp_path / "out", "wait")
    try:
        notes = []
        prepare_directory(tmp_path / "out", on_note=notes.append)
        assert partial.is_dir() and notes == []
    finally:
        child.kill()
        child.wait()
    prepare_directory(tmp_path / "out", on_note=notes.append)
    assert not partial.exists() and len(notes) == 1


def test_a_partial_directory_is_removed_when_its_pid_now_names_another_process(tmp_path):
    child, partial = start_writer(tmp_path / "out", "exit")
    child.wait()
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        reused = partial.rename(partial.with_name(f".out.partial-{other.pid}"))
        prepare_directory(tmp_path / "out")
        assert not reused.exists()
    finally:
        other.kill()
        other.wait()


def test_a_partial_directory_without_a_manifest_is_left_with_a_note(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # an earlier qwenmlx, which wrote no manifest
    child.wait()
    partial = tmp_path / f".out.partial-{child.pid}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"weights")
    notes = []
    prepare_directory(tmp_path / "out", on_note=notes.append)
    assert (partial / "model.safetensors").exists()
    assert notes == [f"left {partial} alone: it has no {MANIFEST}, so it may not be qwenmlx's; "
                     "delete it yourself if nothing is writing it"]


def test_a_replaced_copy_whose_new_version_never_arrived_is_put_back(tmp_path):
    dst = output(tmp_path, {"a.txt": "old"})
    before = files_below(dst)
    child, partial = start_writer(tmp_path / "other", "exit")
    child.wait()
    old = dst.rename(tmp_path / f".out.old-{child.pid}")  # as a replace killed between its two renames
    notes = []
    prepare_directory(tmp_path / "out", force=True, on_note=notes.append)
    assert files_below(dst) == before and not old.exists()
    assert f"restored {dst} from {old.name}" in notes[-1]


# --- a single output file (summarize --out, bench -o) ---

@pytest.fixture
def document(tree):
    (tree / "doc.md").write_text("# Notes")
    (tree / "doclink").symlink_to(tree / "doc.md")
    return tree / "doc.md"


@pytest.mark.parametrize("spelling", ["{tmp}/doc.md", "{tmp}/./doc.md", "../doc.md", "{tmp}/sub/../doc.md",
                                      "{tmp}/doclink", "{tmp}/link/../doc.md", "~/doc.md"])
def test_an_output_file_that_is_its_input_is_refused_however_spelled(document, spelling):
    path = spelling.format(tmp=document.parent)
    message = one_line_error(lambda: check_output_file(path, inputs={"document": document}, force=True))
    assert message == f"{path}: is the document {document}; write to another path"
    assert document.read_text() == "# Notes"


@pytest.mark.parametrize("spelling, says", [
    ("{tmp}", "is a directory"),
    ("{tmp}/src/config.json", "is inside the model directory"),
    ("{tmp}/missing/out.md", "cannot write (no directory {tmp}/missing)"),
    ("/dev/null", "exists and is not a regular file"),
])
def test_an_output_file_is_refused_before_any_work(document, spelling, says):
    path = spelling.format(tmp=document.parent)
    message = one_line_error(lambda: check_output_file(path, inputs={"document": document,
                                                                     "model directory": document.parent / "src"},
                                                       force=True))
    assert message.startswith(f"{path}: {says.format(tmp=document.parent)}")


def test_an_existing_output_file_is_replaced_only_with_force(document):
    (document.parent / "summary.md").write_text("old")
    message = one_line_error(lambda: check_output_file("../summary.md", inputs={"document": document}))
    assert message == "../summary.md: exists; pass --force to replace it"
    target = check_output_file("../summary.md", inputs={"document": document}, force=True)
    write_text_atomically(target, "new")
    assert (document.parent / "summary.md").read_text() == "new"
    assert not list(document.parent.glob(".*.tmp"))


def test_a_failed_write_of_a_file_leaves_no_temporary_file(tmp_path):
    (tmp_path / "summary.md").mkdir()
    message = one_line_error(write_text_atomically, tmp_path / "summary.md", "text")
    assert message.startswith(f"{tmp_path / 'summary.md'}: cannot write")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def test_bench_replaces_only_an_earlier_results_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    (tmp_path / "bench.json").write_text(json.dumps({"machine": {}, "options": {}, "generation": []}))
    (tmp_path / "notes.json").write_text(json.dumps({"machine": "mine"}))
    assert check_results_file(tmp_path / "bench.json", config) == tmp_path / "bench.json"
    assert "it is not an earlier bench result" in one_line_error(check_results_file, tmp_path / "notes.json", config)
    assert "is the --config file" in one_line_error(check_results_file, tmp_path / "config.json", config)


# --- through the command line ---

def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["convert", "quantize"])
@pytest.mark.parametrize("spelling", ["{link}", "{link}/", "./{name}/", "{name}/../{name}", "{name}/.."])
def test_cli_refuses_a_destination_that_is_or_holds_the_source_through_links_and_relative_paths(
        moe_dir, tmp_path, monkeypatch, command, spelling):
    (tmp_path / "link").symlink_to(moe_dir)
    monkeypatch.chdir(moe_dir.parent)
    dst = spelling.format(link=tmp_path / "link", name=moe_dir.name)
    before = snapshot(moe_dir)
    result = CliRunner().invoke(app, [command, str(moe_dir), dst, "--recipe", "q8", "--group-size", "32", "--force"])
    line = one_error_line(result)
    assert line.startswith(f"error: {dst}: ") and f"the source {moe_dir}" in line
    assert snapshot(moe_dir) == before


def test_cli_summarize_refuses_an_out_file_linked_to_its_document(moe_dir, tmp_path):
    (tmp_path / "doc.md").write_text("# Notes\n\nExperts route tokens.\n")
    (tmp_path / "out.md").symlink_to(tmp_path / "doc.md")
    result = CliRunner().invoke(app, ["summarize", str(tmp_path / "doc.md"), "-m", str(moe_dir),
                                      "--out", str(tmp_path / "out.md"), "--force"])
    assert "is the document" in one_error_line(result)
    assert (tmp_path / "doc.md").read_text() == "# Notes\n\nExperts route tokens.\n"


def test_cli_summarize_replaces_an_out_file_with_force(moe_dir, tmp_path):
    (tmp_path / "doc.md").write_text("# Notes\n\nExperts route tokens.\n")
    (tmp_path / "summary.md").write_text("old")
    result = CliRunner().invoke(app, ["summarize", str(tmp_path / "doc.md"), "-m", str(moe_dir), "--max-tokens", "4",
                                      "--out", str(tmp_path / "summary.md"), "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "summary.md").read_text() == json.loads(result.stdout)["summary"] + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.md", "summary.md"]


def test_cli_convert_removes_a_killed_runs_partial_directory_and_says_so(moe_dir, tmp_path):
    child, partial = start_writer(tmp_path / "out", "exit")
    child.wait()
    result = CliRunner().invoke(app, ["convert", str(moe_dir), str(tmp_path / "out"), "--bits", "8",
                                      "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert f"note: removed {partial}" in result.stderr.replace("\n", "")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert set(written_files(tmp_path / "out")) == {p.name for p in (tmp_path / "out").iterdir()} - {MANIFEST}
