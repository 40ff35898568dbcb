"""`info`, `pull`, `list`, `rm`, and the default model: what is in the models directory and how it gets there."""

import sys

import typer

from ..errors import QwenMLXError
from .common import app, console, kinds_table, stderr, user_errors


@app.command()
@user_errors
def info(model: str = typer.Argument(..., help="Model directory, a name from `qwenmlx list`, or a Hugging Face repo id."),
         json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Show what a checkpoint is: architecture, size, quantization, context."""
    import json

    from rich.table import Table

    from ..checkpoint import describe_model
    from ..hub import find_model

    facts = describe_model(find_model(model))
    if json_output:
        print(json.dumps(facts, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        table.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(table)



def default_model_dir():
    """The pulled default; when missing, offered on a terminal (once), otherwise an error naming `qwenmlx pull`."""
    from ..hub import DEFAULT_DOWNLOAD_GB, DEFAULT_OUTPUT_GB, DEFAULT_RECIPE, DEFAULT_REPO, default_model

    path = default_model()
    if path is not None:
        return path
    offer = (f"download {DEFAULT_REPO} ({DEFAULT_DOWNLOAD_GB} GB) and convert it to {DEFAULT_RECIPE} "
             f"({DEFAULT_OUTPUT_GB} GB)")
    if not sys.stdin.isatty():
        raise QwenMLXError(f"no model pulled yet: `qwenmlx pull` will {offer}; or pass --model (a directory, "
                           "a name from `qwenmlx list`, or a Hub id)")
    if not typer.confirm(f"{offer}?", default=False):
        raise QwenMLXError("no model: run `qwenmlx pull`, or pass --model")
    return _pull_with_bars(DEFAULT_REPO, None, None).dst





class PullBars:
    """A pull drawn with rich on stderr: a bar of bytes downloaded (speed, time left), one of tensors written."""

    def __init__(self):
        from rich.console import Group
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        label = TextColumn("[bold]{task.description:<16}")
        self.bytes = Progress(label, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        self.tensors = Progress(label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.live = Live(Group(self.bytes, self.tensors), console=stderr)

    def started(self, download_bytes: int, tensors: int) -> None:
        self.download = self.bytes.add_task("downloading", total=download_bytes)
        if tensors:
            self.writing = self.tensors.add_task("tensors written", total=tensors)

    def downloaded(self, n_bytes: int) -> None:
        self.bytes.advance(self.download, n_bytes)

    def written(self, tensors: int) -> None:
        self.tensors.update(self.writing, completed=tensors)


def with_pull_bars(run, quiet: bool):
    """run(progress) under PullBars (none when quiet or not on a terminal); Ctrl-C says the same command resumes."""
    from ..hub import NO_PROGRESS

    bars = None if quiet or not stderr.is_terminal else PullBars()
    try:
        if bars is None:
            return run(NO_PROGRESS)
        with bars.live:
            return run(bars)
    except KeyboardInterrupt:
        stderr.print("interrupted: the output shards already written are kept, and the same command resumes "
                     "from them", highlight=False, soft_wrap=True)
        sys.exit(130)


def _pull_with_bars(repo_id: str, dst: str | None, recipe: str | None, quiet: bool = False, **options):
    from ..hub import pull as pull_repo

    return with_pull_bars(lambda progress: pull_repo(repo_id, dst, recipe, progress=progress, **options), quiet)


@app.command()
@user_errors
def pull(
    repo_id: str = typer.Argument("Qwen/Qwen3-30B-A3B", help="Hugging Face repo id."),
    dst: str = typer.Argument(None, help="Model directory to write (default: in the models directory)."),
    recipe: str = typer.Option(None, "--recipe", help="Quantization recipe (default: experts-4); a repo already "
                                                      "in MLX's layout is downloaded as it is."),
    group_size: int = typer.Option(64, "--group-size", help="Group size of affine quantization: 32, 64 or 128."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Float dtype of what stays unquantized (and scales)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of tables; no progress bars."),
):
    """Download a Hugging Face model and convert it to MLX, shard by shard (disk: the output + ~2 input shards)."""
    import json

    report = _pull_with_bars(repo_id, dst, recipe, quiet=json_output, group_size=group_size, dtype=dtype,
                             force=force).as_dict()
    if json_output:
        print(json.dumps(report, indent=2))
        return
    if "conversion" in report:
        console.print(kinds_table(f"{report['dst']} (recipe {report['recipe']})", report["conversion"]["kinds"]))
    kept = f", {report['kept_shards']} shard(s) kept from an interrupted pull" if report["kept_shards"] else ""
    console.print(f"[bold]{report['dst']}[/bold]: {report['repo_id']} at {report['commit'][:8]}, {report['recipe']}, "
                  f"{report['size_gb']} GB; downloaded {report['downloaded_gb']} GB{kept}; {report['seconds']} s")


@app.command("list")
@user_errors
def list_command(json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """The models in the models directory ($QWENMLX_HOME/models): name, recipe, size, context."""
    import json

    from rich.table import Table

    from ..hub import list_models, models_dir

    entries = [e.as_dict() for e in list_models()]
    if json_output:
        print(json.dumps(entries, indent=2))
        return
    table = Table(title=str(models_dir()))
    for column in ("name", "recipe", "size (GB)", "context", "from"):
        table.add_column(column, justify="right" if column in ("size (GB)", "context") else "left")
    for e in entries:
        table.add_row(e["name"], e["recipe"] or "—", f"{e['size_bytes'] / 1e9:.2f}",
                      f"{e['context']:,}" if e["context"] else "?", e["repo_id"] or "—")
    console.print(table)


@app.command("rm")
@user_errors
def rm_command(name: str = typer.Argument(..., help="A model's name, as `qwenmlx list` shows it.")):
    """Delete a model that `qwenmlx pull` wrote into the models directory (nothing else)."""
    from ..hub import remove

    console.print(f"removed {remove(name)}")
