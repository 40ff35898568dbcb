"""Bad inputs through the CLI, one row each: every row must end in exit 1, one `error:` line, no traceback, nothing written.

A row's argv may name `{model}` (a tiny MoE checkpoint), `{tmp}` (the row's own empty directory) and the files
that the row's `files` puts in `{tmp}` first. After the run, `{tmp}` and `{model}` hold exactly what they held before.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenmlx.cli import app


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    says: str  # a fragment of the one-line error
    files: dict[str, bytes] = field(default_factory=dict)  # written into {tmp} before the run
    stdin: bytes | None = None


DOCUMENT = b"# Notes\n\nA mixture-of-experts layer routes each token to a few of its experts.\n"

ROWS = [
    # --- destinations: what a command may replace ---
    Row("convert-onto-missing-source", ("convert", "{tmp}/nope", "{tmp}/out"), "nope"),
    Row("convert-onto-its-source", ("convert", "{model}", "{model}"), "is the source"),
    Row("convert-onto-its-source-with-force", ("convert", "{model}", "{model}", "--force"), "is the source"),
    Row("convert-onto-its-source-with-a-trailing-slash", ("convert", "{model}", "{model}/", "--force"), "is the source"),
    Row("convert-onto-its-source-spelled-with-dot", ("convert", "{model}", "{model}/.", "--force"), "is the source"),
    Row("convert-onto-its-source-spelled-with-dot-dot", ("convert", "{model}", "{model}/x/..", "--force"),
        "is the source"),
    Row("convert-onto-the-parent-of-its-source", ("convert", "{model}", "{model}/..", "--force"),
        "contains the source"),
    Row("convert-into-its-source", ("convert", "{model}", "{model}/mlx"), "is inside the source"),
    Row("quantize-onto-its-source", ("quantize", "{model}", "{model}/", "--recipe", "q8", "--group-size", "32",
                                     "--force"), "is the source"),
    Row("quantize-onto-the-parent-of-its-source", ("quantize", "{model}", "{model}/..", "--recipe", "q8",
                                                   "--group-size", "32", "--force"), "contains the source"),
    Row("convert-force-onto-a-directory-qwenmlx-did-not-write", ("convert", "{model}", "{tmp}/photos", "--force"),
        "cat.jpg", files={"photos/cat.jpg": b"\xff\xd8\xff"}),
    Row("convert-force-onto-a-hugging-face-checkpoint", ("convert", "{model}", "{tmp}/hf", "--force"),
        "no finished .qwenmlx.json", files={"hf/config.json": b"{}", "hf/model.safetensors": b"weights"}),
    Row("convert-force-onto-a-qwenmlx-output-with-a-file-added", ("convert", "{model}", "{tmp}/out", "--force"),
        "notes.md", files={"out/.qwenmlx.json": b'{"written_by": "qwenmlx", "pid": 1, "files": ["config.json"]}',
                           "out/config.json": b"{}", "out/notes.md": b"mine"}),
    Row("convert-force-onto-a-file", ("convert", "{model}", "{tmp}/notes.txt", "--force"), "not a directory",
        files={"notes.txt": b"mine"}),
    Row("summarize-out-onto-its-document", ("summarize", "{tmp}/doc.md", "-m", "{model}", "--out", "{tmp}/doc.md"),
        "is the document", files={"doc.md": DOCUMENT}),
    Row("summarize-out-onto-its-document-spelled-with-dot", ("summarize", "{tmp}/doc.md", "-m", "{model}",
                                                             "--out", "{tmp}/./doc.md", "--force"),
        "is the document", files={"doc.md": DOCUMENT}),
    Row("summarize-out-onto-a-file-of-the-model", ("summarize", "{tmp}/doc.md", "-m", "{model}",
                                                   "--out", "{model}/config.json", "--force"),
        "is inside the model directory", files={"doc.md": DOCUMENT}),
    Row("summarize-out-onto-a-directory", ("summarize", "{tmp}/doc.md", "-m", "{model}", "--out", "{tmp}"),
        "is a directory", files={"doc.md": DOCUMENT}),
    Row("summarize-out-onto-an-existing-file", ("summarize", "{tmp}/doc.md", "-m", "{model}", "--out", "{tmp}/old.md"),
        "exists; pass --force", files={"doc.md": DOCUMENT, "old.md": b"mine"}),
    Row("bench-output-onto-its-config", ("bench", "--config", "{tmp}/c.json", "--workdir", "{tmp}/w",
                                         "-o", "{tmp}/c.json"), "is the --config file", files={"c.json": b"{}"}),
    Row("bench-output-onto-a-file-it-did-not-write", ("bench", "--config", "{tmp}/c.json", "--workdir", "{tmp}/w",
                                                      "-o", "{tmp}/notes.md"),
        "not an earlier bench result", files={"c.json": b"{}", "notes.md": b"mine"}),
    Row("bench-workdir-holding-a-directory-it-did-not-write", ("bench", "--config", "{tmp}/c.json",
                                                               "--workdir", "{tmp}", "-o", "{tmp}/b.json"),
        "photo.jpg", files={"c.json": b"{}", "converted-qwenmlx/photo.jpg": b"mine"}),
    # --- chat sessions ---
    # --- options and config values ---
    Row("generate-threads-zero", ("generate", "-m", "{model}", "-p", "hi", "--threads", "0"), "--threads"),
    # --- documents, prompts and templates ---
]


def snapshot(*dirs: Path) -> dict[str, tuple[int, int]]:
    """Every file below dirs with its size and modification time."""
    found = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for name in files:
                path = Path(root) / name
                stat = path.lstat()
                found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_bad_input_is_one_error_line_with_exit_1_and_nothing_written(row, moe_dir, tmp_path):
    for name, data in row.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    argv = [a.format(model=moe_dir, tmp=tmp_path) for a in row.argv]
    before = snapshot(tmp_path, moe_dir)
    result = CliRunner().invoke(app, argv, input=row.stdin)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert row.says in lines[0]
    assert snapshot(tmp_path, moe_dir) == before
