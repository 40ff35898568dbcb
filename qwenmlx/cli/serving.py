"""`serve`: the HTTP server for editors, coding agents and chat UIs."""

import typer

from ..errors import QwenMLXError
from .common import (
    DUAL_CHUNK_OPTION,
    MEMORY_BUDGET_OPTION,
    MEMORY_CHECK_OPTION,
    MODEL_OPTION,
    PARALLEL_OPTION,
    PREFILL_OPTION,
    SELF_EXTEND_OPTION,
    SPARSE_PREFILL_OPTION,
    THREADS_OPTION,
    app,
    attention_options,
    check_threads,
    load_weights,
    open_model,
    user_errors,
)


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
          memory_budget: str = MEMORY_BUDGET_OPTION, parallel: str = PARALLEL_OPTION):
    """A server for editors, coding agents, UIs: OpenAI's Chat Completions and Responses, Anthropic's Messages."""
    import logging
    import os
    from pathlib import Path

    import uvicorn

    from ..attention import keys_at_their_index
    from ..cache import check_bound
    from ..config import read_config
    from ..distributed import join, peers_lost_as_errors
    from ..memory import weights_budget
    from ..server import Engine, LoadedModel, create_app
    from ..server.lockstep import STOP_SECONDS, Lockstep, follow, lead
    from ..server.prompt_cache import default_directory

    if not 0 < port < 65536:
        raise QwenMLXError(f"--port {port}: must be between 1 and 65535")
    check_threads(threads)
    attention = attention_options(self_extend, dual_chunk, sparse_prefill)
    ranks = join(parallel)  # under mlx.launch: every rank runs the engine, rank 0 alone the HTTP side
    model_dir, tokenizer = open_model(model)
    check_bound(max_kv_size, keys_at_their_index(read_config(model_dir), attention))

    prompt_cache_bytes = int(prompt_cache_gb * 1e9)
    if memory_budget is not None:  # the prompt cache counts inside the budget: refused before listening if it does not fit
        weights_budget(model_dir, memory_budget, max_kv_size, kv_bits, prompt_cache_bytes)

    def load() -> LoadedModel:  # on the generation thread: MLX's streams belong to the thread that made them
        llm = load_weights(model_dir, threads, memory_check, max_kv_size, attention, ranks, memory_budget,
                           prompt_cache_bytes, kv_bits=kv_bits, context_option="--max-kv-size", kv_bits_option=True)
        return LoadedModel(llm, tokenizer, llm.fingerprint)

    # uvicorn says only what goes wrong; the engine logs each request, and the address once the model is ready
    # (so a model that fails to load gives one error line).
    logging.basicConfig(level=logging.INFO if ranks.rank == 0 else logging.WARNING, format="%(levelname)s: %(message)s")
    name = Path(model_dir).name
    engine = Engine(load, name=name, max_kv_size=max_kv_size, kv_bits=kv_bits,
                    prompt_cache_bytes=prompt_cache_bytes, max_tokens=max_tokens, max_queue=max_queue,
                    max_batch=max_batch, prefill_step=prefill_step,
                    allow_scripted=os.environ.get("QWENMLX_TEST_HOOKS") == "1",
                    prompt_cache_dir=prompt_cache_dir or (default_directory() if ranks.size == 1 else None),
                    prompt_cache_disk_bytes=int(prompt_cache_disk_gb * 1e9),
                    lockstep=Lockstep(ranks) if ranks.size > 1 else None)
    with peers_lost_as_errors(ranks):
        if ranks.rank != 0:
            follow(engine)
        else:
            # Under several ranks a lost rank can leave answers unfinished for good: stopping waits for them at most
            # STOP_SECONDS.
            server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=api_key, cors_origin=cors_origin),
                                                  host=host, port=port, log_level="warning",
                                                  timeout_graceful_shutdown=STOP_SECONDS if ranks.size > 1 else None))
            engine.start(on_ready=lambda: logging.getLogger("qwenmlx.server").info(
                             "serving %s on http://%s:%d/v1 (Ctrl-C stops)", name, host, port),
                         on_error=lambda e: setattr(server, "should_exit", True))
            if ranks.size > 1:
                lead(engine, server.run)
            else:
                server.run()
        if engine.error is not None:
            raise engine.error
