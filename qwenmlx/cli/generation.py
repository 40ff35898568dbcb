"""`generate` and `chat`: one answer for scripts, a conversation in the terminal."""

import sys

import typer

from .common import (
    BUDGET_OPTION,
    DUAL_CHUNK_OPTION,
    MEMORY_BUDGET_OPTION,
    MEMORY_CHECK_OPTION,
    MIN_P_OPTION,
    MODEL_OPTION,
    PARALLEL_OPTION,
    PREFILL_OPTION,
    PRESENCE_OPTION,
    REPETITION_OPTION,
    SEED_OPTION,
    SELF_EXTEND_OPTION,
    SPARSE_PREFILL_OPTION,
    TEMP_OPTION,
    THREADS_OPTION,
    TOP_K_OPTION,
    TOP_P_OPTION,
    app,
    attention_options,
    check_threads,
    console,
    load_weights,
    open_model,
    sampling_options,
    stderr,
    user_errors,
)


def _prompt_from_stdin() -> str:
    """stdin's bytes, decoded as summarize decodes a file (with a note when not plain UTF-8)."""
    from ..documents import decode_text

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

    from ..distributed import join, peers_lost_as_errors
    from ..generate import check_generation, default_sampling, prompt_messages, stream_generate

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
    from ..chat import ChatSession
    from ..chat_terminal import ChatTerminal
    from ..distributed import SharedInput, join, peers_lost_as_errors
    from ..generate import check_generation

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
