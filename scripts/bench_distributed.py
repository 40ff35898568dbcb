"""Tokens/s and bytes sent per token at 1, 2 and 3 ranks (mlx.launch, ring backend, loopback), in both modes,
and an estimate for two or three Macs over Thunderbolt 5.

    python scripts/bench_distributed.py [--layers 3] [--experts 8] [--vocab 8192] [-o bench-distributed.json]

The checkpoint is synthetic (bench.py's writer): Qwen3-30B-A3B's per-token shapes (hidden 2048, 32/4 heads
of 128, top-8 experts of 768), so each token does the real model's work per layer, but with fewer experts
and a smaller vocabulary than the real 128 and 151,936, so that a rank computing in float32 on the CPU
stays near 1 GB. Three layers, so that a pipeline can have three stages. Every rank runs on one CPU stream
(--threads 1): on one machine the ranks share its cores, so loopback speeds say what communicating costs,
not what several Macs gain. Bytes sent are read from the kernel's per-socket counters (`ss`, Linux).
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwenmlx.bench import REAL_CONFIG, prompt_ids, vm_hwm_gb, write_synthetic_checkpoint  # noqa: E402
from qwenmlx.config import config_from_dict, read_config  # noqa: E402
from qwenmlx.distributed import bytes_sent_per_token, messages_per_token  # noqa: E402

RUNS = [(1, "pipeline"), (2, "pipeline"), (2, "experts"), (3, "pipeline"), (3, "experts")]

# Thunderbolt 5 between two Macs, as the ring backend uses it (TCP over the Thunderbolt bridge):
TB5_BANDWIDTH = 6e9  # bytes/s: of the link's 80 Gb/s (10 GB/s), what TCP over the bridge is assumed to reach
TB5_LATENCY = 50e-6  # s per message hop over TCP; JACCL (RDMA over Thunderbolt 5) is assumed at 10e-6
JACCL_LATENCY = 10e-6
# One Mac running all of Qwen3-30B-A3B (4-bit experts, bf16 elsewhere), assumed: M4 Max class.
ONE_MAC_DECODE_S = 1 / 80  # 80 tok/s decode
ONE_MAC_PREFILL_S = 1 / 1000  # 1,000 tok/s prefill
REAL_DTYPE_BYTES = 2  # bf16 hidden states on a Mac's GPU


def socket_bytes_sent() -> int:
    """Bytes this process has sent over its TCP sockets, from `ss` (0 where there is no `ss`)."""
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for entry in re.split(r"\n(?=\S)", out):
        if f"pid={os.getpid()}," in entry and (m := re.search(r"bytes_sent:(\d+)", entry)):
            total += int(m.group(1))
    return total


def rank_task(model_dir: str, mode: str, prompt_tokens: int, decode_tokens: int, out_dir: str) -> None:
    """One rank: load its share, warm up, then time prefill and decode and count the bytes it sends."""
    from qwenmlx.checkpoint import load_model
    from qwenmlx.distributed import join, load_sharded
    from qwenmlx.generate import Stats, generate_tokens

    ranks = join(mode)
    if ranks.size > 1:
        model = load_sharded(Path(model_dir), ranks, threads=1)
    else:
        model = load_model(model_dir, threads=1)[0]
    prompt = prompt_ids(prompt_tokens, model.config.vocab_size)
    for _ in generate_tokens(model, prompt[:8], max_tokens=4):
        pass
    # The prompt alone (prefill and its first token), then the prompt and decode_tokens more: the difference
    # in bytes sent is decode's alone.
    sent = [socket_bytes_sent()]
    for max_tokens in (1, 1 + decode_tokens):
        stats = Stats()
        for _ in generate_tokens(model, prompt, max_tokens=max_tokens, stats=stats):
            pass
        sent.append(socket_bytes_sent())
    prefill_bytes = sent[1] - sent[0]
    facts = {"rank": ranks.rank, "prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps,
             "prefill_bytes": prefill_bytes, "decode_bytes": sent[2] - sent[1] - prefill_bytes,
             "peak_rss_gb": vm_hwm_gb()}
    (Path(out_dir) / f"rank{ranks.rank}.json").write_text(json.dumps(facts))


def free_port(n: int) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return min(s.getsockname()[1], 65535 - n)


def run(n: int, mode: str, model_dir: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        task = [sys.executable, __file__, "--rank-task", str(model_dir), mode, str(args.prompt_tokens),
                str(args.decode_tokens), out_dir]
        launch = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(n), "--backend", "ring",
                  "-p", str(free_port(n)), "--"]
        result = subprocess.run([*launch, *task] if n > 1 else task, cwd=ROOT, capture_output=True, text=True,
                                timeout=1800)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    if len(ranks) != n:
        raise SystemExit(f"{n} ranks, {mode}: {len(ranks)} reported\n{result.stderr}")
    config = read_config(model_dir)
    return {
        "ranks": n, "mode": mode if n > 1 else "one process",
        "prefill_tps": round(ranks[0]["prefill_tps"], 2), "decode_tps": round(ranks[0]["decode_tps"], 2),
        "decode_bytes_per_token_measured": round(sum(r["decode_bytes"] for r in ranks) / args.decode_tokens),
        "decode_bytes_per_token_planned": bytes_sent_per_token(config, mode, n, 4),
        "prefill_bytes_per_token_measured": round(sum(r["prefill_bytes"] for r in ranks) / args.prompt_tokens),
        "peak_rss_gb_per_rank": [round(r["peak_rss_gb"], 3) for r in ranks],
    }


def thunderbolt_estimate() -> list[dict]:
    """Seconds per token for all of Qwen3-30B-A3B (48 layers) on N Macs, from the assumptions above.

    pipeline: the stages take turns on one sequence, so compute stays one Mac's; add its hops and bytes.
    experts: each Mac computes 1/N of every layer's experts and MLP (attention, about a tenth of the work,
    is replicated and not divided); add 48 all_sums.
    """
    config = config_from_dict(json.loads(REAL_CONFIG.read_text()), source=str(REAL_CONFIG))
    rows = []
    for n, mode in RUNS:
        if n == 1:
            continue
        hops, sent = messages_per_token(config, mode, n), bytes_sent_per_token(config, mode, n, REAL_DTYPE_BYTES)
        per_link = sent / n  # a ring: each Mac sends its share at once
        split = 1.0 if mode == "pipeline" else 0.1 + 0.9 / n
        row = {"ranks": n, "mode": mode, "hops_per_token": hops, "bytes_per_token": sent}
        for name, latency in (("tb5_tcp", TB5_LATENCY), ("tb5_jaccl", JACCL_LATENCY)):
            decode = ONE_MAC_DECODE_S * split + hops * latency + per_link / TB5_BANDWIDTH
            # Prefill of a 512-token chunk: the same hops once per chunk, 512 times the bytes.
            prefill = ONE_MAC_PREFILL_S * split + (hops * latency + 512 * per_link / TB5_BANDWIDTH) / 512
            row[f"{name}_decode_tps"] = round(1 / decode, 1)
            row[f"{name}_prefill_tps"] = round(1 / prefill, 1)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qwenmlx-bench-distributed")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench-distributed.json"))
    args = parser.parse_args()
    config = {**json.loads(REAL_CONFIG.read_text()), "num_hidden_layers": args.layers,
              "num_experts": args.experts, "vocab_size": args.vocab}
    model_dir = args.workdir / f"real-shape-{args.layers}l-{args.experts}e-{args.vocab}v"
    if not model_dir.exists():
        write_synthetic_checkpoint(model_dir, config)
    started = time.time()
    loopback = []
    for n, mode in RUNS:
        loopback.append(run(n, mode, model_dir, args))
        print(json.dumps(loopback[-1]), flush=True)
    result = {"checkpoint": {k: config[k] for k in ("num_hidden_layers", "num_experts", "vocab_size",
                                                     "hidden_size", "num_experts_per_tok", "moe_intermediate_size")},
              "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
              "loopback": loopback, "thunderbolt5_estimate": thunderbolt_estimate(),
              "seconds": round(time.time() - started)}
    args.output.write_text(json.dumps(result, indent=2))
    for row in result["thunderbolt5_estimate"]:
        print(json.dumps(row))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-task"]:
        model_dir, mode, prompt_tokens, decode_tokens, out_dir = sys.argv[2:7]
        rank_task(model_dir, mode, int(prompt_tokens), int(decode_tokens), out_dir)
    else:
        main()
