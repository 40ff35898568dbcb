"""`convert` and `quantize`: Hugging Face checkpoints into MLX, under a recipe."""

import typer

from ..errors import QwenMLXError
from .common import app, console, kinds_table, stderr, user_errors
from .models import with_pull_bars

CHECK_PROMPT = "Explain in two sentences why the sky is blue."
FORCE_HELP = "Replace DST if it is a model directory qwenmlx wrote (never the source, nor anything else)."


def _write_with_progress(plan, dst: str, force: bool, quiet: bool):
    """Run the planned conversion under a rich progress bar over the bytes written (on stderr)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from ..convert import write_model

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=stderr, disable=quiet)
    task = progress.add_task(f"writing {len(plan.steps)} tensors", total=plan.total_bytes)

    def advance(n: int) -> None:
        progress.start()  # at the first bytes: a refused destination is one error line, no bar
        progress.advance(task, n)

    try:
        return write_model(plan, dst, force=force, on_progress=advance,
                           on_note=lambda message: stderr.print(f"[yellow]note:[/yellow] {message}",
                                                                highlight=False, soft_wrap=True))
    finally:
        progress.stop()



def _print_plan(facts: dict) -> None:
    from rich.table import Table

    console.print(kinds_table(f"plan: recipe {facts['recipe']}", facts["kinds"]))
    table = Table(show_header=False, box=None)
    for label, key in (("size on disk (GB)", "size_on_disk_gb"), ("bits per weight", "bits_per_weight"),
                       ("KV cache bf16 (GB)", "kv_cache_gb"), ("KV cache 8-bit (GB)", "kv_cache_8bit_gb"),
                       ("memory, bf16 KV cache (GB)", "memory_gb"),
                       ("memory, 8-bit KV cache (GB)", "memory_8bit_kv_gb")):
        table.add_row(f"[bold]{label}[/bold]", str(facts[key]))
    console.print(f"at a context of {facts['context']} tokens:")
    console.print(table)


def _print_report(report: dict) -> None:
    console.print(kinds_table(f"{report['dst']} (recipe {report['recipe']})", report["kinds"]))
    console.print(f"[bold]{report['size_gb']} GB[/bold] on disk in {report['shards']} shard(s), "
                  f"[bold]{report['bits_per_weight']}[/bold] bits per weight, {report['tensors']} tensors, "
                  f"{report['seconds']} s")
    if "check" in report:
        c = report["check"]
        console.print(f"check on a {c['tokens']}-token prompt: max |Δlogit| {c['max_abs_logit_diff']:.4f}, "
                      f"KL {c['kl_divergence']:.5f}, top-1 agreement {c['top1_agreement']:.1%}")


def _convert(src, dst, recipe, *, dtype, plan_only, context, force, dequantize, check, prompt, json_output):
    """What `convert` and `quantize` share: plan, then write (or print the plan), summary, optional --check."""
    import json
    from pathlib import Path

    from ..convert import OUTPUT_DTYPES, memory_plan, plan_conversion
    from ..hub import convert_from_hub, is_hub_id, open_repo, plan_from_hub

    if dtype not in OUTPUT_DTYPES:
        raise QwenMLXError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    streamed = is_hub_id(src)  # from the Hub shard by shard, as `pull` does: never the whole repo on disk
    if streamed and check:
        raise QwenMLXError(f"--check compares SRC with DST, so SRC must be on disk: `hf download {src} --local-dir DIR`"
                           ", then convert DIR")
    if streamed:
        source = open_repo(src)
        plan = plan_from_hub(source, recipe, dtype, dequantize=dequantize)
    else:
        plan = plan_conversion(src, recipe, OUTPUT_DTYPES[dtype], dequantize=dequantize)
    if plan_only:
        facts = memory_plan(plan, context)
        print(json.dumps(facts, indent=2)) if json_output else _print_plan(facts)
        return
    if streamed:
        report = with_pull_bars(lambda progress: convert_from_hub(
            source, Path(dst), recipe, dtype, force=force, dequantize=dequantize, progress=progress),
            quiet=json_output).conversion.as_dict()
    else:
        report = _write_with_progress(plan, dst, force, quiet=json_output).as_dict()
    if check:
        from ..fidelity import compare_models
        from ..tokenizer import Tokenizer

        tokens = Tokenizer.from_dir(report["dst"]).encode(prompt)
        report["check"] = compare_models(plan.src, report["dst"], tokens)
    print(json.dumps(report, indent=2)) if json_output else _print_report(report)


@app.command()
@user_errors
def convert(
    src: str = typer.Argument(..., help="Hugging Face checkpoint directory or Hub repo id."),
    dst: str = typer.Argument(..., help="New MLX model directory to write."),
    recipe: str = typer.Option(None, "--recipe", help="Quantization recipe: a built-in name or a .toml file."),
    bits: int = typer.Option(None, "--bits", help="Uniform quantization at 4, 6 or 8 bits (the recipe qN)."),
    group_size: int = typer.Option(64, "--group-size", help="Group size of affine quantization: 32, 64 or 128."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Float dtype of what stays unquantized (and scales)."),
    plan: bool = typer.Option(False, "--plan", help="Write nothing; print the size and the memory needed."),
    context: int = typer.Option(32768, "--context", help="Context length the --plan memory figures assume."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dequantize: bool = typer.Option(False, "--dequantize", help="Dequantize an already-quantized SRC first."),
    check: bool = typer.Option(False, "--check", help="Compare the logits of SRC and DST on a prompt."),
    prompt: str = typer.Option(CHECK_PROMPT, "--prompt", help="Prompt that --check runs."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of tables; no progress bar."),
):
    """Convert a Hugging Face checkpoint (bf16/fp16/fp32 or FP8) to MLX, quantized per a recipe or not at all."""
    from quantize import recipe_from_options

    _convert(src, dst, recipe_from_options(recipe, bits, group_size), dtype=dtype, plan_only=plan,
             context=context, force=force, dequantize=dequantize, check=check, prompt=prompt,
             json_output=json_output)


@app.command()
@user_errors
def quantize(
    src: str = typer.Argument(..., help="Unquantized MLX or Hugging Face model directory (or Hub repo id)."),
    dst: str = typer.Argument(..., help="New quantized MLX model directory to write."),
    recipe: str = typer.Option(..., "--recipe", help="Quantization recipe: a built-in name or a .toml file."),
    group_size: int = typer.Option(64, "--group-size", help="Group size of affine quantization: 32, 64 or 128."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Float dtype of what stays unquantized (and scales)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dequantize: bool = typer.Option(False, "--dequantize",
                                    help="Accept an already-quantized SRC: dequantize it first (errors compound)."),
    check: bool = typer.Option(False, "--check", help="Compare the logits of SRC and DST on a prompt."),
    prompt: str = typer.Option(CHECK_PROMPT, "--prompt", help="Prompt that --check runs."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of tables; no progress bar."),
):
    """Quantize an unquantized model per a recipe (same streaming and atomic writing as convert)."""
    from quantize import get_recipe

    if dequantize:
        stderr.print("[yellow]warning:[/yellow] dequantizing a quantized model and quantizing it again adds "
                     "the new rounding error to the old one")
    _convert(src, dst, get_recipe(recipe, group_size), dtype=dtype, plan_only=False, context=0, force=force,
             dequantize=dequantize, check=check, prompt=prompt, json_output=json_output)
