"""Time to first token and decode speed through `qwenmlx serve`, against in-process generation and `mlx_lm.server`.

The same model, the same requests (greedy chat completions, streamed, each prompt different so no prompt
cache helps), measured the same way on the client: the first token is the first streamed chunk with
text; decode speed is the tokens after it over the time to the last one. Both servers run at once,
idle but for the request at hand, and the three sides take turns on each prompt, so a machine whose
load changes during the run changes every side's figures alike.

    python scripts/make_tiny_checkpoint.py /tmp/tiny          # or any Qwen3 / Qwen3-MoE directory
    python scripts/bench_serve.py /tmp/tiny --prompt-tokens 512 --max-tokens 128 --repeats 5

--concurrent N measures batching instead: aggregate decode speed of N streams at once against one stream
alone, through one `qwenmlx serve --max-batch N` (with --model-level: the model's batched decode step
alone, without the server). --restart measures the prompt cache on disk: one long
prompt to a fresh `qwenmlx serve`, then the same prompt again after the server was stopped and started
on the same cache directory.
"""

import argparse
import concurrent.futures
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, words: int) -> list[str]:
    """n different prompts of about `words` tokens, different from their first token on."""
    filler = "the quick brown fox jumps over the lazy dog " * (words // 9 + 1)
    return [f"{i} {' '.join(filler.split()[:words])}" for i in range(n)]


def start(command: list[str], url: str) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[2]} exited before it served: {' '.join(command)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{command[2]} did not start")


def through_server(url: str, model: str, prompt: str, max_tokens: int, arrivals: list | None = None) -> dict:
    """One streamed request's figures; `arrivals` (if given) gets the time of each chunk with text."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0)
    start_time, usage = time.perf_counter(), None
    arrivals = [] if arrivals is None else arrivals
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0.0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta and (delta.content or getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)):
            arrivals.append(time.perf_counter())
    tokens = usage.completion_tokens if usage else len(arrivals)
    cached = usage.prompt_tokens_details.cached_tokens if usage else 0
    return figures(arrivals[0] - start_time, tokens, arrivals[-1] - arrivals[0]) | {"cached_tokens": cached}


def figures(ttft: float, tokens: int, decode_seconds: float) -> dict:
    return {"ttft_ms": ttft * 1000, "tokens": tokens,
            "decode_tps": (tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0}


def aggregate_decode(url: str, model: str, batch: list[str], max_tokens: int) -> float:
    """Tokens per second decoded by all the streams together, from the first first token to the last token."""
    timelines = [[] for _ in batch]
    with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
        results = list(pool.map(lambda i: through_server(url, model, batch[i], max_tokens, timelines[i]),
                                range(len(batch))))
    start, end = min(t[0] for t in timelines), max(t[-1] for t in timelines)
    return sum(r["tokens"] - 1 for r in results) / (end - start)


def concurrent_streams(model_dir: str, streams: int, prompt_tokens: int, max_tokens: int, repeats: int) -> None:
    """Aggregate decode speed of `streams` requests at once against one alone, on one batching server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start([sys.executable, "-m", "qwenmlx", "serve", "-m", model_dir, "--port", str(port),
                     "--max-batch", str(streams), "--prompt-cache-gb", "0", "--prompt-cache-disk-gb", "0"], url)
    rows = {1: [], streams: []}
    try:
        texts = iter(prompts((repeats + 1) * (streams + 1), prompt_tokens))
        for i in range(repeats + 1):
            for n in (1, streams) if i % 2 else (streams, 1):  # who goes first changes every round
                figure = aggregate_decode(url, model_dir, [next(texts) for _ in range(n)], max_tokens)
                if i:  # the first round warms up
                    rows[n].append(figure)
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"{model_dir}: greedy chat requests of ~{prompt_tokens} prompt tokens, {max_tokens} generated, "
          f"{repeats} rounds; medians\n")
    print("| streams at once | aggregate decode (tok/s) | per stream (tok/s) |")
    print("|---:|---:|---:|")
    for n, figures_ in rows.items():
        print(f"| {n} | {statistics.median(figures_):.1f} | {statistics.median(figures_) / n:.1f} |")


def model_level(model_dir: str, streams: int, prompt_tokens: int, repeats: int) -> None:
    """`batch.decode_step` alone, without the server: one sequence and `streams` at once, taking turns."""
    import mlx.core as mx

    from qwenmlx.batch import decode_step
    from qwenmlx.cache import make_cache
    from qwenmlx.checkpoint import load

    model, tokenizer = load(model_dir)
    rows = {}
    for n in (1, streams):
        caches = [make_cache(model) for _ in range(n)]
        for text, cache in zip(prompts(n, prompt_tokens), caches):
            model(mx.array(tokenizer.encode(text))[None], cache)
        rows[n] = (caches, mx.zeros((n,), mx.int32), [])
    for _ in range(repeats + 1):  # the first round warms up
        for caches, tokens, times in rows.values():
            start_time = time.perf_counter()
            mx.eval(mx.argmax(decode_step(model, tokens, caches), axis=-1))
            times.append(time.perf_counter() - start_time)
    print(f"{model_dir}: batch.decode_step after ~{prompt_tokens}-token prompts, best of {repeats} steps\n")
    print("| sequences at once | step (ms) | aggregate decode (tok/s) |")
    print("|---:|---:|---:|")
    for n, (_, _, times) in rows.items():
        print(f"| {n} | {min(times[1:]) * 1000:.1f} | {n / min(times[1:]):.1f} |")


def across_a_restart(model_dir: str, prompt_tokens: int, max_tokens: int) -> None:
    """The same long prompt before and after a restart of `qwenmlx serve` on one prompt cache directory."""
    prompt = prompts(1, prompt_tokens)[0]
    print(f"{model_dir}: one greedy chat request of ~{prompt_tokens} prompt tokens, {max_tokens} generated\n")
    print("| | time to first token (ms) | prompt tokens read from the cache |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as cache_dir:
        for run in ("first start (empty cache)", "after a restart"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process = start([sys.executable, "-m", "qwenmlx", "serve", "-m", model_dir, "--port", str(port),
                             "--prompt-cache-dir", cache_dir], url)
            try:
                result = through_server(url, model_dir, prompt, max_tokens)
            finally:
                process.terminate()
                process.wait(timeout=30)
            print(f"| {run} | {result['ttft_ms']:.0f} | {result['cached_tokens']} |")


def in_process(model, tokenizer, prompt: str, max_tokens: int) -> dict:
    from qwenmlx.generate import Sampling, stream_generate

    tokens = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    for step in stream_generate(model, tokenizer, tokens, sampling=Sampling(), max_tokens=max_tokens):
        stats = step.stats
    return figures(stats.prefill_seconds, stats.generated_tokens, stats.decode_seconds)


def serve_commands(model_dir: str) -> dict[str, tuple[str, list[str]]]:
    """Each server's URL and command line, on ports of their own."""
    qwenmlx_port, mlx_lm_port = free_port(), free_port()
    return {
        "qwenmlx serve": (f"http://127.0.0.1:{qwenmlx_port}", [
            sys.executable, "-m", "qwenmlx", "serve", "-m", model_dir, "--port", str(qwenmlx_port),
            "--prompt-cache-gb", "0", "--prompt-cache-disk-gb", "0"]),
        "mlx_lm.server": (f"http://127.0.0.1:{mlx_lm_port}", [
            sys.executable, "-m", "mlx_lm.server", "--model", model_dir, "--port", str(mlx_lm_port),
            "--prompt-cache-size", "0"]),
    }


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Model directory.")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="Requests per side (after one warm-up).")
    parser.add_argument("--restart", action="store_true", help="Measure the prompt cache across a restart.")
    parser.add_argument("--concurrent", type=int, metavar="N", help="Measure N streams at once against one.")
    parser.add_argument("--model-level", action="store_true",
                        help="With --concurrent: batch.decode_step alone, without the server.")
    args = parser.parse_args()
    if args.concurrent and args.model_level:
        return model_level(args.model, args.concurrent, args.prompt_tokens, args.repeats)
    if args.concurrent:
        return concurrent_streams(args.model, args.concurrent, args.prompt_tokens, args.max_tokens, args.repeats)
    if args.restart:
        return across_a_restart(args.model, args.prompt_tokens, args.max_tokens)

    from qwenmlx.checkpoint import load

    servers = serve_commands(args.model)
    processes = [start(command, url) for url, command in servers.values()]
    try:
        model, tokenizer = load(args.model)
        sides = {"in-process generate": lambda prompt: in_process(model, tokenizer, prompt, args.max_tokens)}
        for name, (url, _) in servers.items():
            sides[name] = lambda prompt, url=url: through_server(url, args.model, prompt, args.max_tokens)
        rows = {name: [] for name in sides}
        for i, prompt in enumerate(prompts(args.repeats + 1, args.prompt_tokens)):
            names = list(sides)[i % 3:] + list(sides)[: i % 3]  # who goes first changes every prompt
            for name in names:
                result = sides[name](prompt)
                if i:  # the first prompt warms every side up
                    rows[name].append(result)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)

    print(f"{args.model}: {args.repeats} greedy chat requests of ~{args.prompt_tokens} prompt tokens, "
          f"up to {args.max_tokens} generated; medians\n")
    print("| | time to first token (ms) | decode (tok/s) | tokens generated |")
    print("|---|---:|---:|---:|")
    for name, results in rows.items():
        print(f"| {name} | {median(results, 'ttft_ms'):.0f} | {median(results, 'decode_tps'):.1f} | "
              f"{median(results, 'tokens'):.0f} |")


if __name__ == "__main__":
    main()
