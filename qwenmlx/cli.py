"""The `qwenmlx` command: a thin Typer layer over the library; each command is a plain function."""

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

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
            stderr.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


@app.command()
@user_errors
def info(model: str = typer.Argument(..., help="Model directory, a name from `qwenmlx list`, or a Hugging Face repo id."),
         json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Show what a checkpoint is: architecture, size, quantization, context."""
    import json

    from rich.table import Table

    from .checkpoint import describe_model
    from .hub import find_model

    facts = describe_model(find_model(model))
    if json_output:
        print(json.dumps(facts, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        table.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(table)


# --- generation: `generate` and `chat` ---


def open_model(model: str | None):
    """(model dir, tokenizer) for -m (a directory, a name from `qwenmlx list`, a Hub id), or the pulled default."""
    from .checkpoint import resolve_model_dir
    from .hub import find_model
    from .tokenizer import Tokenizer

    model_dir = resolve_model_dir(find_model(model)) if model else default_model_dir()
    return model_dir, Tokenizer.from_dir(model_dir)


def default_model_dir():
    """The pulled default; when missing, offered on a terminal (once), otherwise an error naming `qwenmlx pull`."""
    from .hub import DEFAULT_DOWNLOAD_GB, DEFAULT_OUTPUT_GB, DEFAULT_RECIPE, DEFAULT_REPO, default_model

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


def load_weights(model_dir, threads: int | None, memory_check: bool, context: int | None,
                 attention: dict | None = None, ranks=None, memory_budget: str | None = None,
                 prompt_cache_bytes: int = 0, **levers):
    """The model's weights (this rank's share under mlx.launch), once the memory check says they fit.

    The check counts weights + KV cache at `context` against this machine's memory times the ranks.
    attention: load_model's self_extend and dual_chunk, as attention_options gives them. memory_budget:
    the experts streamed from disk to keep within it, beside the KV cache and a prompt cache of prompt_cache_bytes.
    """
    from .checkpoint import load_model
    from .distributed import load_sharded
    from .generate import available_memory
    from .memory import check_memory, weights_budget

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
    from .attention import check_past_window, parse_self_extend

    options = {"self_extend": None if self_extend is None else parse_self_extend(self_extend), "dual_chunk": dual_chunk}
    check_past_window(**options)
    return {**options, "sparse_prefill": sparse_prefill}


def sampling_options(temp, top_p, top_k, min_p, presence_penalty, repetition_penalty, seed) -> dict:
    return dict(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                repetition_penalty=repetition_penalty, seed=seed)


def check_threads(threads: int | None) -> None:
    """--threads checked before any model is loaded; more than the cores is capped, with a note."""
    from .cpu_streams import thread_count

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


def _prompt_from_stdin() -> str:
    """stdin's bytes, decoded as summarize decodes a file (with a note when not plain UTF-8)."""
    from .documents import decode_text

    decoded = decode_text("stdin", sys.stdin.buffer.read())
    if decoded.note:
        stderr.print(f"[yellow]note:[/yellow] {decoded.note}", highlight=False, soft_wrap=True)
    return decoded.text


@app.command()
@user_errors
def generate(prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt, or - to read it from stdin."),
             model: str = MODEL_OPTION,
             max_tokens: int = typer.Option(512, "--max-tokens"),
             think: bool = typer.Option(False, "--think/--no-think", help="Let the model think first."),
             system: str = typer.Option(None, "--system", help="System prompt."),
             temp: float = TEMP_OPTION, top_p: float = TOP_P_OPTION, top_k: int = TOP_K_OPTION,
             min_p: float = MIN_P_OPTION, presence_penalty: float = PRESENCE_OPTION,
             repetition_penalty: float = REPETITION_OPTION, seed: int = SEED_OPTION,
             thinking_budget: int = BUDGET_OPTION, prefill_step: int = PREFILL_OPTION,
             threads: int = THREADS_OPTION, memory_check: bool = MEMORY_CHECK_OPTION,
             self_extend: str = SELF_EXTEND_OPTION, dual_chunk: bool = DUAL_CHUNK_OPTION,
             sparse_prefill: bool = SPARSE_PREFILL_OPTION,
             parallel: str = PARALLEL_OPTION, memory_budget: str = MEMORY_BUDGET_OPTION,
             json_output: bool = typer.Option(False, "--json", help="Print JSON with the text, token counts, speeds.")):
    """One answer to one prompt, for scripts: the text on stdout (or JSON)."""
    import json

    from .distributed import join, peers_lost_as_errors
    from .generate import check_generation, default_sampling, prompt_messages, stream_generate

    options = sampling_options(temp, top_p, top_k, min_p, presence_penalty, repetition_penalty, seed)
    check_generation(max_tokens, thinking_budget, prefill_step, **options)
    check_threads(threads)
    attention = attention_options(self_extend, dual_chunk, sparse_prefill)
    ranks = join(parallel)
    if prompt == "-":
        ranks.check_can_read_stdin("-p -")
    text = _prompt_from_stdin() if prompt == "-" else prompt
    messages = prompt_messages(text, system)
    model_dir, tokenizer = open_model(model)
    tokens = tokenizer.apply_chat_template(messages, enable_thinking=think, tokenize=True)
    sampling = default_sampling(tokenizer.thinks(think), tokenizer.generation_config, **options)
    pieces, stats = [], None
    with peers_lost_as_errors(ranks):
        llm = load_weights(model_dir, threads, memory_check, len(tokens) + max_tokens, attention, ranks, memory_budget,
                           prompt_tokens=len(tokens), context_option="--max-tokens")
        for step in stream_generate(llm, tokenizer, tokens, sampling=sampling, max_tokens=max_tokens,
                                    thinking_budget=thinking_budget, prefill_step=prefill_step):
            stats = step.stats
            pieces.append(step.text)
            if not json_output:
                sys.stdout.write(step.text)
                sys.stdout.flush()
    if json_output:
        print(json.dumps({"text": "".join(pieces), **stats.to_dict(), **ranks.describe()}, indent=2))
    else:
        sys.stdout.write("\n")


@app.command()
@user_errors
def chat(model: str = MODEL_OPTION,
         max_kv_size: int = typer.Option(None, "--max-kv-size",
                                         help="Bound the KV cache to N tokens (rotating; keeps the first 4)."),
         kv_bits: int = typer.Option(None, "--kv-bits", help="Quantize the KV cache to 8 or 4 bits."),
         think: bool = typer.Option(True, "--think/--no-think", help="Thinking mode at the start."),
         system: str = typer.Option(None, "--system", help="System prompt."),
         max_tokens: int = typer.Option(8192, "--max-tokens", help="Longest answer, in tokens."),
         hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not show the <think> part."),
         plain: bool = typer.Option(False, "--plain", help="Plain streamed text: no live view, no Markdown."),
         temp: float = TEMP_OPTION, top_p: float = TOP_P_OPTION, top_k: int = TOP_K_OPTION,
         min_p: float = MIN_P_OPTION, presence_penalty: float = PRESENCE_OPTION,
         repetition_penalty: float = REPETITION_OPTION, seed: int = SEED_OPTION,
         thinking_budget: int = BUDGET_OPTION, prefill_step: int = PREFILL_OPTION, threads: int = THREADS_OPTION,
         memory_check: bool = MEMORY_CHECK_OPTION, self_extend: str = SELF_EXTEND_OPTION,
         dual_chunk: bool = DUAL_CHUNK_OPTION, sparse_prefill: bool = SPARSE_PREFILL_OPTION,
         parallel: str = PARALLEL_OPTION, memory_budget: str = MEMORY_BUDGET_OPTION):
    """Chat in the terminal, with thinking, prompt reuse across turns and /commands (/help)."""
    from .chat import ChatSession
    from .chat_terminal import ChatTerminal
    from .distributed import SharedInput, join, peers_lost_as_errors
    from .generate import check_generation

    options = sampling_options(temp, top_p, top_k, min_p, presence_penalty, repetition_penalty, seed)
    check_generation(max_tokens, thinking_budget, prefill_step, **options)
    check_threads(threads)
    attention = attention_options(self_extend, dual_chunk, sparse_prefill)
    ranks = join(parallel)
    model_dir, tokenizer = open_model(model)
    with peers_lost_as_errors(ranks):
        with console.status(f"loading {model_dir}"):
            llm = load_weights(model_dir, threads, memory_check, max_kv_size, attention, ranks, memory_budget,
                               kv_bits=kv_bits, context_option="--max-kv-size", kv_bits_option=True)
        session = ChatSession(llm, tokenizer, system=system, thinking=think, max_kv_size=max_kv_size,
                              kv_bits=kv_bits, max_tokens=max_tokens, thinking_budget=thinking_budget,
                              prefill_step=prefill_step, **options)
        terminal = ChatTerminal(session, console, plain=plain, hide_thinking=hide_thinking)
        if ranks.size > 1:  # rank 0 reads the terminal; every rank gets what it read
            terminal.reader = SharedInput(terminal.reader, ranks)
        terminal.run()


# --- serve ---


@app.command()
@user_errors
def serve(model: str = MODEL_OPTION,
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
          port: int = typer.Option(8080, "--port"),
          api_key: str = typer.Option(None, "--api-key", help="Require KEY (as Bearer or x-api-key; not on /health)."),
          cors_origin: str = typer.Option(None, "--cors-origin", help="Allow browser pages from this origin (CORS)."),
          max_kv_size: int = typer.Option(None, "--max-kv-size", help="Bound each request's KV cache to N tokens."),
          kv_bits: int = typer.Option(None, "--kv-bits", help="Quantize the KV cache to 8 or 4 bits."),
          prompt_cache_gb: float = typer.Option(2.0, "--prompt-cache-gb",
                                                help="Memory for KV caches kept across requests; 0 keeps none."),
          prompt_cache_dir: str = typer.Option(None, "--prompt-cache-dir", help="Where prompt caches outlive the "
                                                "process (default: .prompt-cache in the models directory)."),
          prompt_cache_disk_gb: float = typer.Option(20.0, "--prompt-cache-disk-gb",
                                                     help="Disk for prompt caches; 0 keeps none on disk."),
          max_tokens: int = typer.Option(None, "--max-tokens", help="Longest answer (default: up to the context)."),
          max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait; past that, 503."),
          max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together; past that, they wait."),
          prefill_step: int = PREFILL_OPTION, threads: int = THREADS_OPTION,
          memory_check: bool = MEMORY_CHECK_OPTION, self_extend: str = SELF_EXTEND_OPTION,
          dual_chunk: bool = DUAL_CHUNK_OPTION, sparse_prefill: bool = SPARSE_PREFILL_OPTION,
          memory_budget: str = MEMORY_BUDGET_OPTION):
    """A server for editors, coding agents, UIs: OpenAI's Chat Completions and Responses, Anthropic's Messages."""
    import logging
    import os
    from pathlib import Path

    import uvicorn

    from .attention import keys_at_their_index
    from .cache import check_bound
    from .config import read_config
    from .distributed import check_one_rank
    from .memory import weights_budget
    from .server import Engine, LoadedModel, create_app
    from .server.prompt_cache import default_directory

    if not 0 < port < 65536:
        raise QwenMLXError(f"--port {port}: must be between 1 and 65535")
    check_one_rank("serve")
    check_threads(threads)
    attention = attention_options(self_extend, dual_chunk, sparse_prefill)
    model_dir, tokenizer = open_model(model)
    check_bound(max_kv_size, keys_at_their_index(read_config(model_dir), attention))

    prompt_cache_bytes = int(prompt_cache_gb * 1e9)
    if memory_budget is not None:  # the prompt cache counts inside the budget: refused before listening if it does not fit
        weights_budget(model_dir, memory_budget, max_kv_size, kv_bits, prompt_cache_bytes)

    def load() -> LoadedModel:  # on the generation thread: MLX's streams belong to the thread that made them
        llm = load_weights(model_dir, threads, memory_check, max_kv_size, attention, None, memory_budget,
                           prompt_cache_bytes, kv_bits=kv_bits, context_option="--max-kv-size", kv_bits_option=True)
        return LoadedModel(llm, tokenizer, llm.fingerprint)

    # uvicorn says only what goes wrong; the engine logs each request, and the address once the model is ready
    # (so a model that fails to load gives one error line).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    name = Path(model_dir).name
    engine = Engine(load, name=name, max_kv_size=max_kv_size, kv_bits=kv_bits,
                    prompt_cache_bytes=prompt_cache_bytes, max_tokens=max_tokens, max_queue=max_queue,
                    max_batch=max_batch, prefill_step=prefill_step,
                    allow_scripted=os.environ.get("QWENMLX_TEST_HOOKS") == "1",
                    prompt_cache_dir=prompt_cache_dir or default_directory(),
                    prompt_cache_disk_bytes=int(prompt_cache_disk_gb * 1e9))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=api_key, cors_origin=cors_origin),
                                          host=host, port=port, log_level="warning"))
    engine.start(on_ready=lambda: logging.getLogger("qwenmlx.server").info(
                     "serving %s on http://%s:%d/v1 (Ctrl-C stops)", name, host, port),
                 on_load_error=lambda e: setattr(server, "should_exit", True))
    server.run()
    if engine.load_error is not None:
        raise engine.load_error


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

    from .convert import write_model

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


def _kinds_table(title: str, kinds: list[dict]):
    from rich.table import Table

    table = Table(title=title)
    for column in ("module kind", "quantization", "bits/weight", "size (MB)", "rel. error ‖W−Q(W)‖/‖W‖"):
        table.add_column(column, justify="left" if column in ("module kind", "quantization") else "right")
    for k in kinds:
        error = k["relative_error"]
        table.add_row(k["kind"], k["quantization"], f"{k['bits_per_weight']:.3f}", f"{k['bytes'] / 1e6:.1f}",
                      "—" if error is None else f"{error:.4f}")
    return table


def _print_plan(facts: dict) -> None:
    from rich.table import Table

    console.print(_kinds_table(f"plan: recipe {facts['recipe']}", facts["kinds"]))
    table = Table(show_header=False, box=None)
    for label, key in (("size on disk (GB)", "size_on_disk_gb"), ("bits per weight", "bits_per_weight"),
                       ("KV cache bf16 (GB)", "kv_cache_gb"), ("KV cache 8-bit (GB)", "kv_cache_8bit_gb"),
                       ("memory, bf16 KV cache (GB)", "memory_gb"),
                       ("memory, 8-bit KV cache (GB)", "memory_8bit_kv_gb")):
        table.add_row(f"[bold]{label}[/bold]", str(facts[key]))
    console.print(f"at a context of {facts['context']} tokens:")
    console.print(table)


def _print_report(report: dict) -> None:
    console.print(_kinds_table(f"{report['dst']} (recipe {report['recipe']})", report["kinds"]))
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

    from .convert import OUTPUT_DTYPES, memory_plan, plan_conversion
    from .hub import convert_from_hub, is_hub_id, open_repo, plan_from_hub

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
        report = _with_pull_bars(lambda progress: convert_from_hub(
            source, Path(dst), recipe, dtype, force=force, dequantize=dequantize, progress=progress),
            quiet=json_output).conversion.as_dict()
    else:
        report = _write_with_progress(plan, dst, force, quiet=json_output).as_dict()
    if check:
        from .fidelity import compare_models
        from .tokenizer import Tokenizer

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


# --- pull, list, rm: the models directory ---


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


def _with_pull_bars(run, quiet: bool):
    """run(progress) under PullBars (none when quiet or not on a terminal); Ctrl-C says the same command resumes."""
    from .hub import NO_PROGRESS

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
    from .hub import pull as pull_repo

    return _with_pull_bars(lambda progress: pull_repo(repo_id, dst, recipe, progress=progress, **options), quiet)


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
        console.print(_kinds_table(f"{report['dst']} (recipe {report['recipe']})", report["conversion"]["kinds"]))
    kept = f", {report['kept_shards']} shard(s) kept from an interrupted pull" if report["kept_shards"] else ""
    console.print(f"[bold]{report['dst']}[/bold]: {report['repo_id']} at {report['commit'][:8]}, {report['recipe']}, "
                  f"{report['size_gb']} GB; downloaded {report['downloaded_gb']} GB{kept}; {report['seconds']} s")


@app.command("list")
@user_errors
def list_command(json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """The models in the models directory ($QWENMLX_HOME/models): name, recipe, size, context."""
    import json

    from rich.table import Table

    from .hub import list_models, models_dir

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
    from .hub import remove

    console.print(f"removed {remove(name)}")


# --- summarize ---


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
            if DEBUG:
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

    from .config import read_config
    from .destinations import check_output_file, write_text_atomically
    from .distributed import join, peers_lost_as_errors
    from .documents import read_document
    from .memory import budget_limits, summary_context
    from .summarize import SummaryOptions, needs_dual_chunk
    from .summarize import summarize as summarize_document

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

    from .bench import QUICK, BenchOptions, check_results_file, result_tables, run_bench
    from .bench_budget import budget_tables, run_budget_bench
    from .destinations import resolve, write_text_atomically

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
