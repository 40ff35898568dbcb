"""`qwenmlx bench --memory-budget`: decoding with the experts streamed from disk, at budgets below the weights.

Each run loads the synthetic experts-N checkpoint (bench.py writes it) in a child process of its own with a
budget of a share of its weights, prefills a prompt and decodes, and reports decode speed, how often the
router's experts were already in a slot, the megabytes read from disk per token and the peak RSS.

Random weights route almost uniformly, the worst case for a cache, so every budget also runs with a router
bias that skews the choice like real traffic: a Zipf law over each layer's experts (exponent ZIPF_EXPONENT,
a random order per layer). That is an assumed skew, labelled as such, not a published measurement.
At two budgets the eviction policies (experts.POLICIES), at one reading ahead (off by default) and reading a
step's misses in turn before computing (rather than on reader threads while the experts found are computed)
are compared on both routings.
"""

import os
import time
from collections.abc import Callable

import numpy as np

from .bench import BenchOptions, bench_config, machine, prompt_ids, run_child, synthetic_checkpoints, vm_hwm_gb
from .errors import QwenMLXError
from .experts import DEFAULT_POLICY, POLICIES

BUDGET_SHARES = (1.0, 0.75, 0.5, 0.35)  # of the weights in memory
POLICY_SHARES = (0.5, 0.35)  # where the eviction policies are compared
READ_AHEAD_SHARE = 0.5  # where reading ahead, and reading misses in turn rather than while computing, are
ROUTINGS = ("uniform", "zipf")
ZIPF_EXPONENT = 1.0


def zipf_bias(num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """log p for p ∝ 1/rank^ZIPF_EXPONENT, experts ranked in a random order (in units of the logits' spread)."""
    ranks = rng.permutation(num_experts) + 1
    return -ZIPF_EXPONENT * np.log(ranks)


class RoutingCounter:
    """How the routers choose: each layer's choices per expert (the skew the table reports)."""

    def __init__(self):
        self.choices: dict[int, np.ndarray] = {}

    def add(self, layer: int, expert_ids: np.ndarray, num_experts: int) -> None:
        counts = self.choices.setdefault(layer, np.zeros(num_experts, np.int64))
        np.add.at(counts, expert_ids.reshape(-1), 1)

    def top_tenth_share(self) -> float:
        """The share of all choices that went to each layer's most chosen tenth of its experts."""
        top = total = 0
        for counts in self.choices.values():
            ranked = np.sort(counts)[::-1]
            top += ranked[: max(1, len(ranked) // 10)].sum()
            total += ranked.sum()
        return float(top / total) if total else 0.0


def watch_routing(model, skewed: bool) -> RoutingCounter:
    """Count every MoE layer's choices in decode; with skewed, first add a Zipf bias to its router logits,
    scaled by the logits' own spread (measured on the first call) so that it skews the choice without fixing it."""
    import mlx.core as mx
    import mlx.nn as nn

    counter = RoutingCounter()

    class BiasedRouter(nn.Module):
        def __init__(self, router: nn.Module, bias: np.ndarray):
            super().__init__()
            self.router, self.bias, self.scale = router, bias, None

        def __call__(self, x: mx.array) -> mx.array:
            logits = self.router(x)
            if self.scale is None:
                self.scale = float(mx.std(logits.astype(mx.float32), axis=-1).mean())
            return logits + mx.array(self.bias * self.scale, dtype=logits.dtype)

    class CountedExperts(nn.Module):
        def __init__(self, experts: nn.Module, layer: int):
            super().__init__()
            self.experts, self.layer = experts, layer

        def __call__(self, x: mx.array, expert_ids: mx.array) -> mx.array:
            if x.shape[-2] == 1:
                counter.add(self.layer, np.array(expert_ids), model.config.num_experts)
            return self.experts(x, expert_ids)

    rng = np.random.default_rng(0)
    for i, layer in enumerate(model.layers):
        if "gate" in layer.mlp:
            if skewed:
                layer.mlp.gate = BiasedRouter(layer.mlp.gate, zipf_bias(model.config.num_experts, rng))
            layer.mlp.switch_mlp = CountedExperts(layer.mlp.switch_mlp, i)
    return counter


def measure(task: dict) -> dict:
    """One budgeted run in this (child) process."""
    from .checkpoint import load_model
    from .experts import stream_counts
    from .generate import generate_tokens

    model, _ = load_model(task["model"], threads=task["threads"], memory_budget=task["budget"],
                          expert_policy=task["policy"], read_ahead=task["read_ahead"],
                          overlap_reads=task["overlap"])
    routing = watch_routing(model, task["routing"] == "zipf")
    prompt = prompt_ids(task["prompt_tokens"], model.config.vocab_size)
    n, after_prefill = 0, None
    for _ in generate_tokens(model, prompt, max_tokens=task["decode_tokens"]):
        n += 1
        if n == 1:
            after_prefill, first = vars(stream_counts(model)).copy(), time.perf_counter()
    end = time.perf_counter()
    decode = {k: v - after_prefill[k] for k, v in vars(stream_counts(model)).items()}
    lookups = decode["hits"] + decode["misses"]
    return {"decode_tps": (n - 1) / (end - first),
            "hit_rate": decode["hits"] / lookups if lookups else 1.0,
            "mb_read_per_token": decode["bytes_read"] / (n - 1) / 1e6,
            "top_tenth_share": routing.top_tenth_share(),
            "read_ahead_right": decode["read_ahead_used"] / max(decode["read_ahead_used"] + decode["read_ahead_unused"], 1),
            "peak_rss_gb": vm_hwm_gb()}


def runs(weights: int) -> list[dict]:
    """Every budget on both routings with the default policy, then the other policies at POLICY_SHARES and
    reading ahead and reading in turn at READ_AHEAD_SHARE."""
    planned = [dict(share=s, routing=r, policy=DEFAULT_POLICY) for s in BUDGET_SHARES for r in ROUTINGS]
    planned += [dict(share=s, routing=r, policy=p) for s in POLICY_SHARES for r in ROUTINGS
                for p in POLICIES if p != DEFAULT_POLICY]
    planned += [dict(share=READ_AHEAD_SHARE, routing=r, policy=DEFAULT_POLICY, **change) for r in ROUTINGS
                for change in ({"read_ahead": True}, {"overlap": True}, {"overlap": False})]  # the last two back to back
    planned = [{"read_ahead": False, "overlap": True, **run} for run in planned]
    for run in planned:
        run["budget"] = None if run["share"] == 1.0 else int(run["share"] * weights)
    return planned


def run_budget_bench(options: BenchOptions, on_step: Callable[[str, int, int], None] = lambda *_: None) -> dict:
    """Measure decoding under each budget; on_step(label, done, total) reports progress. Returns plain data."""
    from .checkpoint import compute_dtype, memory_budget_parts, weights_in_memory

    if options.layers < 1 or options.prompt_tokens < 1 or options.decode_tokens < 2:
        raise QwenMLXError("--layers and --prompt-tokens must be at least 1, --decode-tokens at least 2")
    options.workdir.mkdir(parents=True, exist_ok=True)
    bench_config(options.config, options.layers)
    facts = machine()
    options.bits = options.bits[:1]
    on_step("writing the synthetic checkpoint (once per size)", 0, 1)
    _, checkpoints = synthetic_checkpoints(options)
    model_dir = checkpoints[options.bits[0]]
    weights = weights_in_memory(model_dir, compute_dtype())
    minimum = memory_budget_parts(model_dir).minimum
    planned = [run for run in runs(weights) if run["budget"] is None or run["budget"] >= minimum]
    rows = []
    for done, run in enumerate(planned):
        on_step(f"{run['share']:.0%} of the weights, {run['routing']} routing, {run['policy']}"
                f"{', read-ahead' if run['read_ahead'] else ''}{'' if run['overlap'] else ', misses read in turn'}",
                done, len(planned))
        task = dict(kind="memory-budget", model=str(model_dir), threads=options.threads,
                    prompt_tokens=options.prompt_tokens, decode_tokens=options.decode_tokens, **run)
        rows.append({**run, **run_child(task)})
    on_step("done", len(planned), len(planned))
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"machine": facts, "options": {"layers": options.layers, "bits": options.bits[0],
                                          "config": str(options.config), "prompt_tokens": options.prompt_tokens,
                                          "decode_tokens": options.decode_tokens},
            "memory_budget": {"weights_gb": weights / 1e9, "minimum_gb": minimum / 1e9,
                              "zipf_exponent": ZIPF_EXPONENT, "runs": rows}}


def budget_tables(result: dict, markdown: bool = False) -> list:
    """The runs as one table: a row per budget, routing, policy."""
    from rich import box
    from rich.table import Table

    facts = result["memory_budget"]
    table = Table(title=f"experts-{result['options']['bits']}, {result['options']['layers']} layers: weights "
                        f"{facts['weights_gb']:.2f} GB, minimum budget {facts['minimum_gb']:.2f} GB "
                        f"(zipf: router bias, exponent {facts['zipf_exponent']:g}, assumed)",
                  box=box.MARKDOWN if markdown else box.SIMPLE_HEAD)
    for column in ("budget", "routing", "top 10% of experts", "eviction", "read-ahead", "misses read", "decode tok/s",
                   "hit rate", "MB read/token", "peak RSS GB"):
        table.add_column(column, justify="left" if column in ("routing", "eviction") else "right")
    for r in facts["runs"]:
        ahead = f"on ({r['read_ahead_right']:.0%} right)" if r["read_ahead"] else "off"
        table.add_row(f"{r['share']:.0%}", r["routing"], f"{r['top_tenth_share']:.0%} of choices",
                      r["policy"] if r["budget"] else "-", ahead if r["budget"] else "-",
                      ("while computing" if r["overlap"] else "in turn") if r["budget"] else "-", f"{r['decode_tps']:.2f}",
                      f"{r['hit_rate']:.1%}", f"{r['mb_read_per_token']:.1f}", f"{r['peak_rss_gb']:.2f}")
    return [table]
