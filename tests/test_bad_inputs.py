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


ROWS = [
    # --- destinations: what a command may replace ---
    Row("convert-onto-missing-source", ("convert", "{tmp}/nope", "{tmp}/out"), "nope"),
    # --- chat sessions ---
    # --- options and config values ---
    Row("generate-threads-zero", ("generate", "-m", "{model}", "-p", "hi", "--threads", "0"), "--threads"),
    # --- documents, prompts and templates ---
    # --- pull, list, rm: the Hub and the models directory ---
    Row("pull-not-a-repo-id", ("pull", "no-owner", "{tmp}/out"), "not a Hugging Face repo id"),
    Row("pull-unknown-dtype", ("pull", "Qwen/Qwen3-30B-A3B", "{tmp}/out", "--dtype", "int8"), "--dtype"),
    Row("rm-a-path-out-of-the-models-dir", ("rm", "../x"), "not a model name"),
    Row("convert-repo-id-with-check", ("convert", "Qwen/Qwen3-30B-A3B", "{tmp}/out", "--check"), "--check"),
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
