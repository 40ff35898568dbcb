"""The `qwenmlx` command: a thin Typer layer over the library; each command is a plain function."""

import functools
import sys

import typer
from rich.console import Console

from .errors import QwenMLXError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run Qwen3 and Qwen3-MoE models locally with MLX: chat, summarize, convert, quantize.")
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
