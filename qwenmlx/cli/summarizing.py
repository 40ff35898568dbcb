"""`summarize`: a file of any length in one command."""

import functools
import sys

import typer

from . import common
from .common import (
    DUAL_CHUNK_OPTION,
    MEMORY_BUDGET_OPTION,
    MEMORY_CHECK_OPTION,
    MODEL_OPTION,
    PARALLEL_OPTION,
    SELF_EXTEND_OPTION,
    SPARSE_PREFILL_OPTION,
    THREADS_OPTION,
    app,
    attention_options,
    check_threads,
    load_weights,
    open_model,
    stderr,
    user_errors,
)


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

    def _show(self, name: str, description: str, completed: int, total: int | None, rate: str = "") -> None:
        if name not in self.tasks:
            self.tasks[name] = self.bars.add_task(description, total=total, rate=rate)
        self.bars.update(self.tasks[name], description=description, completed=completed, total=total, rate=rate)

    def _new_generation(self) -> None:
        import time

        self.generation_start = time.perf_counter()
        self.tasks.pop("thinking", None)

    def tokenizing(self, done_chars: int, total_chars: int) -> None:
        self._show("tokenize", "tokenising (characters)", done_chars, total_chars)

    def splitting(self, done_chars: int, total_chars: int) -> None:
        self._show("split", "splitting into parts (characters)", done_chars, total_chars)

    def planned(self, plan, level: int) -> None:
        where = f" (summaries of level {level})" if level else ""
        self.bars.console.print(f"[bold]strategy{where}:[/bold] {plan.describe()}", highlight=False, soft_wrap=True)
        self._new_generation()

    def map_step(self, level: int, index: int, total: int, part: str) -> None:
        self._show(f"map{level}", f"map step{f' (level {level})' if level else ''}", index - 1, total)
        self._new_generation()

    def mapped(self, level: int, total: int) -> None:
        self.bars.update(self.tasks[f"map{level}"], completed=total)

    def prefill(self, done: int, total: int) -> None:
        import time

        rate = done / max(time.perf_counter() - self.generation_start, 1e-9)
        self._show("prefill", "prefill (tokens)", done, total, f"{rate:,.0f} tok/s")

    def thinking(self, n_tokens: int) -> None:
        self._show("thinking", "thinking (tokens, not in the summary)", n_tokens, None)

    def answer(self, text: str) -> None:
        if not self.streaming:
            self.close()
            self.streaming = True
        sys.stdout.write(text)
        sys.stdout.flush()

    def close(self) -> None:
        """Stop drawing, each bar as far as it got (not complete after a Ctrl-C)."""
        self.bars.stop()


def _closing_line(summary) -> str:
    """Strategy, YaRN factor, token counts and timings in one line."""
    s, final = summary.seconds, summary.final_stats
    if summary.parts:
        strategy = f"map-reduce: {len(summary.parts)} parts in {len(summary.plans) - 1} level(s), then one pass"
    else:
        strategy = "single pass"
    yarn = f"YaRN factor {summary.yarn_factor}" if summary.yarn_factor else "no YaRN"
    if summary.plans[-1].self_extend:
        yarn = "SelfExtend group {group_size}, window {window}".format(**summary.plans[-1].self_extend)
    elif summary.plans[-1].dual_chunk_context:
        yarn = "dual chunk attention"
    return (
        f"{strategy} · {yarn} · {summary.document_tokens:,} document tokens · final prompt {final.prompt_tokens:,} · "
        f"{summary.generated_tokens:,} generated · tokenise {s['tokenize']:.2f} s · prefill {s['prefill']:.2f} s · "
        f"decode {s['decode']:.2f} s · total {s['total']:.2f} s · final pass {final.prefill_tps:,.0f} tok/s prefill, "
        f"{final.decode_tps:,.1f} tok/s decode · peak {summary.peak_memory_gb:.2f} GB"
    )


def stops_on_ctrl_c(command):
    """Ctrl-C ends the command with one line and exit code 130 (128 + SIGINT), not a traceback; --debug re-raises."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            if common.DEBUG:
                raise
            stderr.print("[red]interrupted[/red]", highlight=False)
            sys.exit(130)

    return wrapper


@app.command()
@user_errors
@stops_on_ctrl_c
def summarize(
    file: str = typer.Argument(..., help="File to summarise (text, Markdown, code, JSON, CSV, HTML, PDF), or - for stdin."),
    model: str = MODEL_OPTION,
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Longest summary, in tokens."),
    style: str = typer.Option("brief", "--style", help="brief, detailed or bullets."),
    lang: str = typer.Option("auto", "--lang", help="Language of the summary: auto (the document's), en, zh, ..."),
    out: str | None = typer.Option(None, "--out", help="Also write the summary to this file."),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists (never an input)."),
    think: bool = typer.Option(False, "--think/--no-think", help="Let the model think first (not part of the summary)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead; no progress bars."),
    threads: int = THREADS_OPTION,
    memory_check: bool = MEMORY_CHECK_OPTION,
    self_extend: str = SELF_EXTEND_OPTION,
    dual_chunk: bool = DUAL_CHUNK_OPTION,
    sparse_prefill: bool = SPARSE_PREFILL_OPTION,
    parallel: str = PARALLEL_OPTION,
    memory_budget: str = MEMORY_BUDGET_OPTION,
):
    """Summarise a file of any length: in one pass (with YaRN or dual chunk attention when needed) or in parts."""
    import json
    from contextlib import nullcontext
    from pathlib import Path

    from ..config import read_config
    from ..destinations import check_output_file, write_text_atomically
    from ..distributed import join, peers_lost_as_errors
    from ..documents import read_document
    from ..memory import budget_limits, summary_context
    from ..summarize import SummaryOptions, needs_dual_chunk
    from ..summarize import summarize as summarize_document

    options = SummaryOptions(style=style, lang=lang, max_tokens=max_tokens, think=think)
    options.check()
    check_threads(threads)
    attention = attention_options(self_extend, dual_chunk, sparse_prefill)
    ranks = join(parallel)
    quiet = json_output or ranks.rank != 0  # under mlx.launch, rank 0 alone shows progress and writes --out
    if out is not None:
        inputs = {"document": Path(file)} if file != "-" else {}
        if Path(model).expanduser().exists():
            inputs["model directory"] = Path(model)
        out = check_output_file(out, inputs=inputs, force=force)
    if file == "-":
        ranks.check_can_read_stdin("summarize -")
    document = read_document(file)
    if document.note and not quiet:
        stderr.print(f"[yellow]note:[/yellow] {document.note}", highlight=False, soft_wrap=True)
    model_dir, tokenizer = open_model(model)
    if attention["self_extend"] is None and needs_dual_chunk(read_config(model_dir), tokenizer, document.text, options):
        attention["dual_chunk"] = True
    with peers_lost_as_errors(ranks):
        with stderr.status(f"loading {model_dir}", spinner="dots") if not quiet else nullcontext():
            # At least the answer must fit; the strategy then fits the document into what is left, in parts if need
            # be (within a budget: into the KV cache's share of it).
            context = answer = max_tokens * (2 if think else 1)
            if memory_budget is not None:
                context = summary_context(model_dir, memory_budget, answer)
            llm = load_weights(model_dir, threads, memory_check, context, attention, ranks, memory_budget,
                               context_option="--max-tokens")
        limits = None if memory_budget is None else budget_limits(model_dir, memory_budget, context)
        progress = None if quiet else SummaryBars()
        try:
            summary = summarize_document(llm, tokenizer, document, options, progress=progress, limits=limits)
        finally:
            if progress is not None and not progress.streaming:
                progress.close()
    if ranks.rank != 0:
        return
    if out is not None:
        write_text_atomically(out, summary.text + "\n")
    if json_output:
        facts = {"file": document.name, "kind": document.kind, "encoding": document.encoding,
                 "decoded_with_fallback": document.decoded_with_fallback, "model": str(model_dir),
                 **summary.to_dict(), **ranks.describe()}
        print(json.dumps(facts, indent=2, ensure_ascii=False))
        return
    print()
    stderr.print(_closing_line(summary), highlight=False, style="dim", soft_wrap=True)
