"""What every command shares: the Typer app, one-line errors, the common options, opening and loading a model."""

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import QwenMLXError

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
            stderr.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


def open_model(model: str | None):
    """(model dir, tokenizer) for -m (a directory, a name from `qwenmlx list`, a Hub id), or the pulled default."""
    from ..checkpoint import resolve_model_dir
    from ..hub import find_model
    from ..tokenizer import Tokenizer
    from .models import default_model_dir

    model_dir = resolve_model_dir(find_model(model)) if model else default_model_dir()
    return model_dir, Tokenizer.from_dir(model_dir)


def load_weights(model_dir, threads: int | None, memory_check: bool, context: int | None,
                 attention: dict | None = None, ranks=None, memory_budget: str | None = None,
                 prompt_cache_bytes: int = 0, **levers):
    """The model's weights (this rank's share under mlx.launch), once the memory check says they fit.

    The check counts weights + KV cache at `context` against this machine's memory times the ranks.
    attention: load_model's self_extend and dual_chunk, as attention_options gives them. memory_budget:
    the experts streamed from disk to keep within it, beside the KV cache and a prompt cache of prompt_cache_bytes.
    """
    from ..checkpoint import load_model
    from ..distributed import load_sharded
    from ..generate import available_memory
    from ..memory import check_memory, weights_budget

    size = ranks.size if ranks is not None else 1
    budget = None if memory_budget is None else weights_budget(model_dir, memory_budget, context,
                                                               levers.get("kv_bits"), prompt_cache_bytes)
    if memory_check:
        check_memory(model_dir, context, attention=attention, weights_budget=budget,
                     budget=available_memory() * size if size > 1 else None, **levers)
    if size > 1:
        if budget is not None:
            raise QwenMLXError("--memory-budget: not under mlx.launch (each rank holds its own share of the experts)")
        return load_sharded(model_dir, ranks, threads=threads, **(attention or {}))
    return load_model(model_dir, threads=threads, memory_budget=budget, **(attention or {}))[0]


def attention_options(self_extend: str | None, dual_chunk: bool, sparse_prefill: bool) -> dict:
    """--self-extend G:W, --dual-chunk and --sparse-prefill, checked, as load_model takes them."""
    from ..attention import check_past_window, parse_self_extend

    options = {"self_extend": None if self_extend is None else parse_self_extend(self_extend), "dual_chunk": dual_chunk}
    check_past_window(**options)
    return {**options, "sparse_prefill": sparse_prefill}


def sampling_options(temp, top_p, top_k, min_p, presence_penalty, repetition_penalty, seed) -> dict:
    return dict(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                repetition_penalty=repetition_penalty, seed=seed)


def check_threads(threads: int | None) -> None:
    """--threads checked before any model is loaded; more than the cores is capped, with a note."""
    from ..cpu_streams import thread_count

    _, note = thread_count(threads)
    if note:
        stderr.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)


MODEL_OPTION = typer.Option(None, "--model", "-m", help="A model directory, a name from `qwenmlx list`, or a Hub id "
                                                       "(default: the pulled Qwen3-30B-A3B, experts-4).")
MEMORY_CHECK_OPTION = typer.Option(True, "--memory-check/--no-memory-check",
                                   help="Refuse a model whose weights and KV cache do not fit in memory.")
MEMORY_BUDGET_OPTION = typer.Option(None, "--memory-budget", help="Keep weights and KV cache within this size "
                                    "(e.g. 10GB): experts are read from disk as the router picks them.")
TEMP_OPTION = typer.Option(None, "--temp", help="Temperature; 0 is greedy. Default: Qwen's guidance for the mode.")
TOP_P_OPTION = typer.Option(None, "--top-p")
TOP_K_OPTION = typer.Option(None, "--top-k")
MIN_P_OPTION = typer.Option(None, "--min-p")
PRESENCE_OPTION = typer.Option(None, "--presence-penalty")
REPETITION_OPTION = typer.Option(None, "--repetition-penalty")
SEED_OPTION = typer.Option(None, "--seed")
BUDGET_OPTION = typer.Option(None, "--thinking-budget", help="Close the thought after this many tokens.")
PREFILL_OPTION = typer.Option(None, "--prefill-step", help="Prompt tokens per prefill chunk (default: from free memory).")
THREADS_OPTION = typer.Option(None, "--threads",
                              help="CPU cores the large matmuls are split over (default and most: all; a GPU ignores it).")
SELF_EXTEND_OPTION = typer.Option(None, "--self-extend", metavar="G:W",
                                  help="SelfExtend attention: exact positions within W tokens, grouped by G beyond "
                                       "(reads ~G times the trained window).")
DUAL_CHUNK_OPTION = typer.Option(False, "--dual-chunk",
                                 help="Dual chunk attention with Qwen's 1M settings (2507 models, past 262,144 tokens).")
SPARSE_PREFILL_OPTION = typer.Option(False, "--sparse-prefill",
                                     help="Dual chunk attention's prefill sparse, per the config's sparse_attention_config "
                                          "(MInference's patterns, as vLLM; slightly different results, no faster yet).")
PARALLEL_OPTION = typer.Option("pipeline", "--parallel",
                               help="Under mlx.launch, how the model is split over the ranks: pipeline (layers) or "
                                    "experts (a share of every expert).")


def kinds_table(title: str, kinds: list[dict]):
    from rich.table import Table

    table = Table(title=title)
    for column in ("module kind", "quantization", "bits/weight", "size (MB)", "rel. error ‖W−Q(W)‖/‖W‖"):
        table.add_column(column, justify="left" if column in ("module kind", "quantization") else "right")
    for k in kinds:
        error = k["relative_error"]
        table.add_row(k["kind"], k["quantization"], f"{k['bits_per_weight']:.3f}", f"{k['bytes'] / 1e6:.1f}",
                      "—" if error is None else f"{error:.4f}")
    return table
