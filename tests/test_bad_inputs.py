"""Bad inputs through the CLI, one row each: every row must end in exit 1, one `error:` line, no traceback, nothing written.

A row's argv may name `{model}` (a tiny MoE checkpoint), `{tmp}` (the row's own empty directory) and the files
that the row's `files` puts in `{tmp}` first. A row with `model_files` gets, as `{model}`, a copy of the checkpoint
in `{tmp}/model` with those files changed. After the run, `{tmp}` and `{model}` hold exactly what they held before.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenmlx.cli import app
from tests.checkpoints import checkpoint_variant


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    says: str  # a fragment of the one-line error
    files: dict[str, bytes] = field(default_factory=dict)  # written into {tmp} before the run
    stdin: bytes | None = None
    model_files: dict[str, bytes | dict] = field(default_factory=dict)  # bytes replace a file, a dict updates JSON


def template(source: str | bytes) -> dict[str, bytes]:
    """model_files giving the model this chat template."""
    return {"chat_template.jinja": source.encode() if isinstance(source, str) else source}


GENERATE = ("generate", "-m", "{model}", "-p", "hi")
QUANTIZE = ("quantize", "{model}", "{tmp}/out", "--recipe", "{tmp}/r.toml")
SUMMARIZE, SHORT_DOCUMENT = ("summarize", "{tmp}/doc.txt", "-m", "{model}"), {"doc.txt": b"A short document."}
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}BODY{% endfor %}{% endfor %}"


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
    Row("generate-max-tokens-zero", (*GENERATE, "--max-tokens", "0"), "--max-tokens must be at least 1, got 0"),
    Row("generate-max-tokens-negative", (*GENERATE, "--max-tokens", "-5"), "--max-tokens must be at least 1, got -5"),
    Row("generate-temp-negative", (*GENERATE, "--temp", "-1"), "--temp must be a number >= 0 (0 is greedy)"),
    Row("generate-temp-nan", (*GENERATE, "--temp", "nan"), "--temp must be a number >= 0 (0 is greedy), got nan"),
    Row("generate-temp-inf", (*GENERATE, "--temp", "inf"), "--temp must be a number >= 0 (0 is greedy), got inf"),
    Row("generate-top-p-2", (*GENERATE, "--top-p", "2"), "--top-p must be in (0, 1], got 2.0"),
    Row("generate-top-p-zero", (*GENERATE, "--top-p", "0"), "--top-p must be in (0, 1], got 0.0"),
    Row("generate-top-k-negative", (*GENERATE, "--top-k", "-3"), "--top-k must be a whole number >= 0"),
    Row("generate-min-p-5", (*GENERATE, "--min-p", "5"), "--min-p must be in [0, 1], got 5.0"),
    Row("generate-repetition-penalty-zero", (*GENERATE, "--repetition-penalty", "0"), "--repetition-penalty must be"),
    Row("generate-presence-penalty-nan", (*GENERATE, "--presence-penalty", "nan"), "--presence-penalty must be"),
    Row("generate-thinking-budget-negative", (*GENERATE, "--thinking-budget", "-1"), "--thinking-budget must be"),
    Row("generate-seed-negative", (*GENERATE, "--seed", "-1"), "--seed must be a whole number from 0"),
    Row("generate-prefill-step-negative", (*GENERATE, "--prefill-step", "-1"), "--prefill-step must be at least 1"),
    Row("generate-prefill-step-zero", (*GENERATE, "--prefill-step", "0"), "--prefill-step must be at least 1"),
    Row("chat-max-kv-size-zero", ("chat", "-m", "{model}", "--max-kv-size", "0"), "--max-kv-size must exceed"),
    Row("chat-max-kv-size-negative", ("chat", "-m", "{model}", "--max-kv-size", "-8"), "--max-kv-size must exceed"),
    Row("chat-top-p-2", ("chat", "-m", "{model}", "--top-p", "2"), "--top-p must be in (0, 1], got 2.0"),
    Row("chat-max-tokens-zero", ("chat", "-m", "{model}", "--max-tokens", "0"), "--max-tokens must be at least 1"),
    Row("convert-plan-context-negative", ("convert", "{model}", "{tmp}/out", "--plan", "--context", "-5"),
        "--context must be at least 1, got -5"),
    Row("convert-group-size-that-divides-nothing",
        ("convert", "{model}", "{tmp}/out", "--bits", "4", "--group-size", "128"), "--group-size 32 or 64 would"),
    Row("config-max-position-embeddings-zero", GENERATE, "'max_position_embeddings' must be a positive integer",
        model_files={"config.json": {"max_position_embeddings": 0}}),
    Row("summarize-config-max-position-embeddings-zero", SUMMARIZE, "'max_position_embeddings' must be",
        files=SHORT_DOCUMENT, model_files={"config.json": {"max_position_embeddings": 0}}),
    Row("config-yarn-factor-negative", GENERATE, "YaRN factor -4.0; it must be a number >= 1",
        model_files={"config.json": {"rope_scaling": {"rope_type": "yarn", "factor": -4.0}}}),
    Row("config-yarn-original-length-zero", SUMMARIZE, "original_max_position_embeddings 0", files=SHORT_DOCUMENT,
        model_files={"config.json": {"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 0}}}),
    Row("model-path-that-does-not-exist", ("generate", "-m", "./no-such-model", "-p", "hi"),
        "./no-such-model: no such directory"),
    # --- documents, prompts and templates ---
    Row("prompt-empty", ("generate", "-m", "{model}", "-p", ""), "the prompt is empty"),
    Row("prompt-blank", ("generate", "-m", "{model}", "-p", " \n\t"), "the prompt is empty"),
    Row("prompt-empty-stdin", ("generate", "-m", "{model}", "-p", "-"), "the prompt is empty", stdin=b""),
    Row("template-include", GENERATE, "chat template: {% include %} is not allowed",
        model_files=template("{% include 'other.jinja' %}")),
    Row("template-import", GENERATE, "chat template: {% import %} is not allowed",
        model_files=template("{% import 'macros.jinja' as m %}{{ m.turn() }}")),
    Row("template-syntax-error", GENERATE, "chat template: line 2: unexpected '}'",
        model_files=template("{% for m in messages %}\n{{ m.content }\n{% endfor %}")),
    Row("template-unclosed-block", GENERATE, "chat template: line 1: Unexpected end of template",
        model_files=template("{% for m in messages %}{{ m.content }}")),
    Row("template-division-by-zero", GENERATE, "chat template: ZeroDivisionError: division by zero",
        model_files=template("{{ 1/0 }}")),
    Row("template-endless-recursion", GENERATE, "chat template: recursion too deep",
        model_files=template("{% macro turn() %}{{ turn() }}{% endmacro %}{{ turn() }}")),
    Row("template-empty", GENERATE, "chat template: empty", model_files=template("")),
    Row("template-renders-nothing", GENERATE, "chat template: renders nothing",
        model_files=template("{% if false %}never{% endif %}")),
    Row("template-not-utf8", GENERATE, "chat_template.jinja: not UTF-8",
        model_files=template(b"{{ messages[0].content }} caf\xe9")),
    Row("tokenizer-config-not-utf8", GENERATE, "tokenizer_config.json: not UTF-8",
        model_files={"tokenizer_config.json": b'{"chat_template": "caf\xe9"}'}),
    Row("template-loops-for-ever", GENERATE, "chat template: stopped after 1,000,000 loop steps",
        model_files=template(NESTED_LOOPS.replace("BODY", ""))),
    Row("template-output-without-bound", GENERATE, "chat template: stopped: its output passed",
        model_files=template(NESTED_LOOPS.replace("BODY", "<|im_start|>" * 8))),
    Row("template-huge-string", GENERATE, "chat template: stopped: it would build",
        model_files=template("{{ 'x' * 10**10 }}")),
    Row("template-string-doubling", GENERATE, "chat template: stopped: it would build",
        model_files=template("{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                             "{% set ns.s = ns.s ~ ns.s %}{% endfor %}")),
    Row("template-huge-padding", GENERATE, "chat template: stopped: it would build",
        model_files=template("{{ messages[0].content|center(10**10) }}")),
    Row("template-huge-format-width", GENERATE, "chat template: stopped: it would build",
        model_files=template("{{ '%99999999999d' % 1 }}")),
    Row("recipe-not-utf8", QUANTIZE, "r.toml: not UTF-8", files={"r.toml": b"description = 'caf\xe9'\n"}),
    Row("recipe-layer-the-model-lacks", QUANTIZE, "names layer 99, but the model has 3 layers (0 to 2)",
        files={"r.toml": b'[[rules]]\npattern = "mlp"\nbits = 4\ngroup_size = 32\nlayers = [0, 99]\n'}),
    Row("recipe-negative-layer", QUANTIZE, "r.toml: rules[0]: layers must be",
        files={"r.toml": b'[[rules]]\npattern = "mlp"\nbits = 4\nlayers = [-1]\n'}),
    Row("recipe-quantizes-nothing", QUANTIZE, "recipe r: quantizes nothing",
        files={"r.toml": b'[[rules]]\npattern = "no-such-module"\nbits = 4\n'}),
    Row("recipe-bad-default-bits", QUANTIZE, "r.toml: [default]: bits must be one of",
        files={"r.toml": b"[default]\nbits = 7\n"}),
    Row("recipe-default-not-a-table", QUANTIZE, "r.toml: [default] must be a table", files={"r.toml": b"default = 4\n"}),
    Row("recipe-unknown-key-in-default", QUANTIZE, "unknown key 'bit' in [default]",
        files={"r.toml": b"[default]\nbit = 4\n"}),
    Row("recipe-rules-not-tables", QUANTIZE, "r.toml: rules must be an array of tables", files={"r.toml": b"rules = 5\n"}),
    Row("generate-binary-stdin", ("generate", "-m", "{model}", "-p", "-"), "stdin: binary data (contains NUL bytes)",
        stdin=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    Row("generate-false-utf16-stdin", ("generate", "-m", "{model}", "-p", "-"), "stdin: binary data (starts like UTF-16",
        stdin=b"\xff\xfe\x00\xd8"),
    # --- the server ---
    Row("serve-port-zero", ("serve", "-m", "{model}", "--port", "0"), "--port 0"),
    Row("serve-max-queue-negative", ("serve", "-m", "{model}", "--max-queue", "-1"), "--max-queue -1"),
    Row("serve-kv-bits-3", ("serve", "-m", "{model}", "--kv-bits", "3"), "--kv-bits 3"),
    Row("serve-max-kv-size-within-the-sinks", ("serve", "-m", "{model}", "--max-kv-size", "4"), "--max-kv-size must exceed"),
    Row("serve-max-tokens-zero", ("serve", "-m", "{model}", "--max-tokens", "0"), "--max-tokens 0"),
    Row("serve-max-batch-zero", ("serve", "-m", "{model}", "--max-batch", "0"), "--max-batch 0: must be at least 1"),
    Row("serve-prompt-cache-disk-gb-negative", ("serve", "-m", "{model}", "--prompt-cache-disk-gb", "-1"),
        "--prompt-cache-disk-gb: must be 0 or more"),
    Row("serve-prompt-cache-dir-is-a-file", ("serve", "-m", "{model}", "--prompt-cache-dir", "{tmp}/notes.txt"),
        "notes.txt: cannot create it", files={"notes.txt": b"my notes"}),
    # --- pull, list, rm: the Hub and the models directory ---
    Row("pull-not-a-repo-id", ("pull", "no-owner", "{tmp}/out"), "not a Hugging Face repo id"),
    Row("pull-unknown-dtype", ("pull", "Qwen/Qwen3-30B-A3B", "{tmp}/out", "--dtype", "int8"), "--dtype"),
    Row("rm-a-path-out-of-the-models-dir", ("rm", "../x"), "not a model name"),
    Row("convert-repo-id-with-check", ("convert", "Qwen/Qwen3-30B-A3B", "{tmp}/out", "--check"), "--check"),
    # --- attention past the trained window ---
    Row("generate-self-extend-without-a-window", (*GENERATE, "--self-extend", "4"), "--self-extend must be G:W"),
    Row("generate-self-extend-group-zero", (*GENERATE, "--self-extend", "0:1024"), "--self-extend must be G:W"),
    Row("chat-self-extend-not-numbers", ("chat", "-m", "{model}", "--self-extend", "four:many"),
        "--self-extend must be G:W"),
    Row("chat-self-extend-with-a-rotating-cache", ("chat", "-m", "{model}", "--self-extend", "4:16",
                                                   "--max-kv-size", "64"), "--max-kv-size: SelfExtend"),
    Row("summarize-self-extend-negative-window", (*SUMMARIZE, "--self-extend", "4:-16"), "--self-extend must be G:W",
        files=SHORT_DOCUMENT),
    Row("serve-self-extend-with-a-rotating-cache", ("serve", "-m", "{model}", "--self-extend", "4:16",
                                                    "--max-kv-size", "64"), "--max-kv-size: SelfExtend"),
    Row("serve-self-extend-and-dual-chunk", ("serve", "-m", "{model}", "--self-extend", "4:16", "--dual-chunk"),
        "choose one"),
    Row("generate-sparse-prefill-without-dual-chunk-attention", (*GENERATE, "--sparse-prefill"),
        "--sparse-prefill is part of dual chunk attention"),
    Row("chat-sparse-prefill-without-sparse-attention-config", ("chat", "-m", "{model}", "--sparse-prefill"),
        "this model's config has none",
        model_files={"config.json": {"dual_chunk_attention_config": {"chunk_size": 24, "local_size": 8,
                                                                     "original_max_position_embeddings": 32}}}),
    Row("generate-self-extend-and-dual-chunk", (*GENERATE, "--self-extend", "4:16", "--dual-chunk"), "choose one"),
    Row("generate-dual-chunk-on-a-model-trained-on-fewer-positions", (*GENERATE, "--dual-chunk"),
        "trained on 262,144 positions"),
    Row("chat-dual-chunk-config-with-yarn", ("chat", "-m", "{model}"), "cannot be combined with rope_scaling",
        model_files={"config.json": {"dual_chunk_attention_config": {"chunk_size": 24, "local_size": 8,
                                                                     "original_max_position_embeddings": 32},
                                     "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 1024}}}),
    # --- several machines ---
    Row("generate-unknown-parallel-mode", (*GENERATE, "--parallel", "tensor"), "--parallel tensor"),
    # --- memory budget: experts streamed from disk ---
    Row("memory-budget-not-a-size", (*GENERATE, "--memory-budget", "ten"), "memory budget 'ten': not a size"),
    Row("memory-budget-zero", ("chat", "-m", "{model}", "--memory-budget", "0"), "must be more than zero"),
    Row("memory-budget-below-the-minimum", (*GENERATE, "--memory-budget", "1MB"), "needs at least"),
    Row("memory-budget-below-the-minimum-in-summarize", (*SUMMARIZE, "--memory-budget", "1MB"),
        "needs at least", files=SHORT_DOCUMENT),
    Row("memory-budget-without-room-for-the-prompt-cache", ("serve", "-m", "{model}", "--memory-budget", "100MB",
                                                           "--prompt-cache-gb", "1"), "prompt cache 1 GB"),
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
    model = checkpoint_variant(moe_dir, tmp_path / "model", row.model_files) if row.model_files else moe_dir
    argv = [a.format(model=model, tmp=tmp_path) for a in row.argv]
    before = snapshot(tmp_path, moe_dir)
    result = CliRunner().invoke(app, argv, input=row.stdin)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert row.says in lines[0]
    assert snapshot(tmp_path, moe_dir) == before
