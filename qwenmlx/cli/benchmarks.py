"""`bench`: qwenmlx against mlx-lm on synthetic real-shape checkpoints."""

import typer
from rich.console import Console

from ..errors import QwenMLXError
from .common import app, check_threads, console, stderr, user_errors


@app.command()
@user_errors
def bench(
    ctx: typer.Context,
    layers: int = typer.Option(2, "--layers", help="Real-shape Qwen3-30B-A3B layers in the synthetic model."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens"),
    decode_tokens: int = typer.Option(128, "--decode-tokens"),
    bits: str = typer.Option("4,6", "--bits", help="Experts' bit widths, comma-separated."),
    repeats: int = typer.Option(2, "--repeats", help="Runs per side; the sides alternate."),
    contexts: str = typer.Option("8192,32768", "--contexts", help="Long-context lengths; empty to skip."),
    context_steps: int = typer.Option(8, "--context-steps", help="Decode steps timed per long-context cache."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype of both sides."),
    default_dtypes: bool = typer.Option(True, "--default-dtypes/--no-default-dtypes",
                                        help="Also run mlx-lm at its own default dtype (bf16: slow on a CPU)."),
    convert: bool = typer.Option(True, "--convert/--no-convert", help="Also compare the two converters."),
    threads: int = typer.Option(None, "--threads", help="qwenmlx's CPU cores (default: all)."),
    quick: bool = typer.Option(False, "--quick", help="A few minutes: 32+16 tokens, 4-bit, 8K only, no bf16, "
                                                      "no conversion (explicit options still apply)."),
    config: str = typer.Option(None, "--config", help="config.json whose shapes the synthetic model takes "
                                                      "(default: Qwen3-30B-A3B's)."),
    workdir: str = typer.Option(None, "--workdir", help="Where the synthetic checkpoints are written and kept."),
    output: str = typer.Option("bench.json", "--output", "-o",
                               help="JSON file of the results (replaces only an earlier one)."),
    markdown: bool = typer.Option(False, "--markdown", help="Draw the tables as Markdown (for the README)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of tables; no progress bar."),
    memory_budget: bool = typer.Option(False, "--memory-budget", help="Instead: qwenmlx alone with its experts "
                                       "streamed, at budgets of 100/75/50/35% of the weights (first of --bits)."),
):
    """Benchmark qwenmlx against mlx-lm on synthetic real-shape checkpoints: speed, memory, kernels, conversion."""
    import json
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench import QUICK, BenchOptions, check_results_file, result_tables, run_bench
    from ..bench_budget import budget_tables, run_budget_bench
    from ..destinations import resolve, write_text_atomically

    def numbers(text: str, option: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise QwenMLXError(f"{option} takes comma-separated integers, got {text!r}") from None

    if dtype not in ("float32", "bfloat16", "float16"):
        raise QwenMLXError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    check_threads(threads)
    values = dict(layers=layers, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                  bits=numbers(bits, "--bits"), repeats=repeats, contexts=numbers(contexts, "--contexts"),
                  context_steps=context_steps, dtype=dtype, default_dtypes=default_dtypes, convert=convert,
                  threads=threads)
    if quick:  # the preset, then whatever was given explicitly
        values = {**QUICK, **{k: v for k, v in values.items()
                              if ctx.get_parameter_source(k).name != "DEFAULT"}}
    options = BenchOptions(**values)
    if workdir:
        options.workdir = resolve(workdir)  # the converters run in their own working directory
    if config:
        options.config = Path(config)
    results_file = check_results_file(output, options.config)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=stderr, disable=json_output)
    task = progress.add_task("bench", total=None)

    def on_step(label: str, done: int, total: int) -> None:
        progress.start()  # after run_bench's checks: a refused option or path is one error line, no bar
        progress.update(task, description=label, completed=done, total=total)

    run, tables = (run_budget_bench, budget_tables) if memory_budget else (run_bench, result_tables)
    try:
        result = run(options, on_step)
    finally:
        progress.stop()
    write_text_atomically(results_file, json.dumps(result, indent=2))
    if json_output:
        print(json.dumps(result, indent=2))
        return
    out = Console(width=1000) if markdown else console  # Markdown rows must not wrap
    for table in tables(result, markdown):
        out.print(table)
    console.print(f"JSON: {output}")
