"""The `qwenmlx` command: a thin Typer layer over the library; each command is a plain function."""

import functools
import sys
from contextlib import nullcontext
from pathlib import Path

import typer
from rich.console import Console

from .errors import QwenMLXError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run Qwen3 and Qwen3-MoE models locally with MLX: chat, summarize, convert, quantize.")
DEFAULT_MODEL = "Qwen/Qwen3-30B-A3B"
console = Console()
stderr = Console(stderr=True)
DEBUG = False


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    """Run Qwen3 / Qwen3-MoE models locally with MLX."""
    global DEBUG
    DEBUG = debug


def user_errors(command):
    """Turn a QwenMLXError (bad file, bad option) into one red line and exit code 1; --debug re-raises."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except QwenMLXError as e:
            if DEBUG:
                raise
            stderr.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


@app.command()
@user_errors
def info(model: str = typer.Argument(..., help="Model directory or Hugging Face repo id."),
         json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Show what a checkpoint is: architecture, size, quantization, context."""
    import json

    from rich.table import Table

    from .checkpoint import describe_model

    facts = describe_model(model)
    if json_output:
        print(json.dumps(facts, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        table.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(table)


class SummaryBars:
    """A summary run drawn with rich: bars on stderr for tokenising, each map step and prefill; the answer on stdout."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=stderr)
        self.tasks: dict[str, int] = {}
        self.generation_start = 0.0
        self.streaming = False
        self.bars.start()

    def _show(self, name: str, description: str, completed: int, total: int, rate: str = "") -> None:
        if name not in self.tasks:
            self.tasks[name] = self.bars.add_task(description, total=total, rate=rate)
        self.bars.update(self.tasks[name], description=description, completed=completed, total=total, rate=rate)

    def _new_generation(self) -> None:
        import time

        self.generation_start = time.perf_counter()
        self.tasks.pop("thinking", None)

    def tokenizing(self, done_chars: int, total_chars: int) -> None:
        self._show("tokenize", "tokenising (characters)", done_chars, total_chars)

    def planned(self, plan, level: int) -> None:
        where = f" (summaries of level {level})" if level else ""
        self.bars.console.print(f"[bold]strategy{where}:[/bold] {plan.describe()}", highlight=False)
        self._new_generation()

    def map_step(self, level: int, index: int, total: int, part: str) -> None:
        self._show(f"map{level}", f"map step{f' (level {level})' if level else ''}", index - 1, total)
        self._new_generation()

    def prefill(self, done: int, total: int) -> None:
        import time

        rate = done / max(time.perf_counter() - self.generation_start, 1e-9)
        self._show("prefill", "prefill (tokens)", done, total, f"{rate:,.0f} tok/s")

    def thinking(self, n_tokens: int) -> None:
        self._show("thinking", "thinking (tokens, not in the summary)", n_tokens, 0)

    def answer(self, text: str) -> None:
        if not self.streaming:
            self.close()
            self.streaming = True
        sys.stdout.write(text)
        sys.stdout.flush()

    def close(self) -> None:
        for name, task in self.tasks.items():
            if name.startswith("map"):
                self.bars.update(task, completed=self.bars.tasks[task].total)
        self.bars.stop()


def _closing_line(summary) -> str:
    """Strategy, YaRN factor, token counts and timings in one line."""
    s, final = summary.seconds, summary.final_stats
    parts = f", {len(summary.parts)} parts in {len(summary.plans) - 1} level(s)" if summary.parts else ""
    yarn = f"YaRN factor {summary.yarn_factor}" if summary.yarn_factor else "no YaRN"
    return (
        f"{summary.strategy}{parts} · {yarn} · {summary.document_tokens:,} document tokens · "
        f"final prompt {final.prompt_tokens:,} · {summary.generated_tokens:,} generated · "
        f"tokenise {s['tokenize']:.2f} s · prefill {s['prefill']:.2f} s ({final.prefill_tps:,.0f} tok/s) · "
        f"decode {s['decode']:.2f} s ({final.decode_tps:,.1f} tok/s) · total {s['total']:.2f} s · "
        f"peak {summary.peak_memory_gb:.2f} GB"
    )


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it into place: never a half-written file."""
    import os
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot write ({e.strerror})") from None


@app.command()
@user_errors
def summarize(
    file: str = typer.Argument(..., help="File to summarise (text, Markdown, code, JSON, CSV, HTML, PDF), or - for stdin."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model directory or Hugging Face repo id."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Longest summary, in tokens."),
    style: str = typer.Option("brief", "--style", help="brief, detailed or bullets."),
    lang: str = typer.Option("auto", "--lang", help="Language of the summary: auto (the document's), en, zh, ..."),
    out: str | None = typer.Option(None, "--out", help="Also write the summary to this file."),
    think: bool = typer.Option(False, "--think/--no-think", help="Let the model think first (not part of the summary)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead; no progress bars."),
):
    """Summarise a file of any length: in one pass, with YaRN when needed, or in parts (map-reduce)."""
    import json

    from .checkpoint import load
    from .documents import read_document
    from .summarize import SummaryOptions
    from .summarize import summarize as summarize_document

    options = SummaryOptions(style=style, lang=lang, max_tokens=max_tokens, think=think)
    options.check()
    out = Path(out) if out else None
    if out is not None and not out.parent.is_dir():
        raise QwenMLXError(f"{out}: cannot write (no directory {out.parent})")
    document = read_document(file)
    if document.note and not json_output:
        stderr.print(f"[yellow]note:[/yellow] {document.note}", highlight=False)
    with stderr.status(f"loading {model}", spinner="dots") if not json_output else nullcontext():
        loaded_model, tokenizer = load(model)
    progress = None if json_output else SummaryBars()
    try:
        summary = summarize_document(loaded_model, tokenizer, document, options, progress=progress)
    finally:
        if progress is not None and not progress.streaming:
            progress.close()
    if out is not None:
        _write_atomically(out, summary.text + "\n")
    if json_output:
        facts = {"file": document.name, "kind": document.kind, "encoding": document.encoding,
                 "decoded_with_fallback": document.decoded_with_fallback, "model": model, **summary.to_dict()}
        print(json.dumps(facts, indent=2, ensure_ascii=False))
        return
    print()
    stderr.print(_closing_line(summary), highlight=False, style="dim")
