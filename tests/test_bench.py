"""The benchmark's mechanics on tiny models: kernel counting, the result's shape, bad options. No timings asserted."""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from rich.console import Console
from typer.testing import CliRunner

from qwenmlx.bench import REAL_CONFIG, BenchOptions, decode_step_kernels, measure_command, result_tables, run_bench
from qwenmlx.bench_budget import budget_tables, run_budget_bench
from qwenmlx.cli import app
from qwenmlx.config import config_from_dict
from qwenmlx.cpu_streams import cpu_threads
from qwenmlx.errors import QwenMLXError
from qwenmlx.experts import DEFAULT_POLICY

# Qwen3-30B-A3B's config with every size shrunk (group-64 quantization still divides every input width).
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=64, vocab_size=512)


def tiny_raw(layers: int) -> dict:
    return {**json.loads(REAL_CONFIG.read_text()), **TINY, "num_hidden_layers": layers}


def tiny_models(layers: int):
    """(qwenmlx, mlx-lm) models with the same 4-bit weights, router unquantized (ours loaded as from a checkpoint)."""
    from mlx_lm.models import qwen3_moe

    from qwenmlx.model import Model

    def quantized(model):
        nn.quantize(model, 64, 4, class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("mlp.gate"))
        return model

    theirs = quantized(qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(tiny_raw(layers))))
    ours = quantized(Model(config_from_dict(tiny_raw(layers))))
    ours.load_weights(tree_flatten(theirs.parameters()))
    mx.eval(ours.parameters(), theirs.parameters())
    return ours, theirs


@pytest.mark.parametrize("side", [0, 1], ids=["qwenmlx", "mlx-lm"])
def test_kernel_counts_per_layer_agree_across_depths(side):
    from mlx_lm.models.cache import make_prompt_cache

    from qwenmlx.cache import make_cache

    counts = []
    for layers in (1, 2):
        model = tiny_models(layers)[side]
        cache = make_cache(model) if side == 0 else make_prompt_cache(model)
        mx.eval(model(mx.array([[1, 2, 3, 4]]), cache))  # warm the cache, as after a prompt
        counts.append(decode_step_kernels(model, cache))
    one, two = counts
    assert one["per_layer"] == two["per_layer"] > 10
    assert two["total"] == two["head"] + 2 * two["per_layer"]
    assert "GatherQMM" in two["by_primitive"] and "Reshape" not in two["by_primitive"]
    assert 0 < two["distinct"] <= len(two["by_primitive"])


def test_run_bench_result_shape(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_raw(1)))
    options = BenchOptions(layers=1, prompt_tokens=4, decode_tokens=3, bits=(4,), repeats=1, contexts=(64,),
                           context_steps=1, default_dtypes=False, convert=False, config=config,
                           workdir=tmp_path / "work", bandwidth_gb=0.01)
    steps = []
    result = run_bench(options, lambda label, done, total: steps.append((done, total)))
    assert steps[-1][0] == steps[-1][1] == 1 + 2 * 2  # bandwidth, then generate and context per side
    assert result["read_bandwidth_gbps"] > 0
    assert [(r["side"], r["bits"], r["dtype"]) for r in result["generation"]] == [
        ("qwenmlx", 4, "float32"), ("mlx-lm", 4, "float32")]
    for row in result["generation"]:
        assert row["decode_tps"] > 0 and row["prefill_tps"] > 0 and row["peak_rss_gb"] > 0
        assert 0 < row["kernels"]["per_layer"] < row["kernels"]["total"]
        split = row["side"] == "qwenmlx" and cpu_threads() > 1  # its experts' pairs split over the streams
        assert (row["kernels"]["cpu_total"] > row["kernels"]["total"]) == split
        assert row["bytes_per_token"] > 0 and row["fraction_of_bound"] > 0
    assert {(r["side"], r["cache"]) for r in result["long_context"]} == {
        (side, kind) for side in ("qwenmlx", "mlx-lm") for kind in ("growing", "rotating", "8-bit")}
    assert set(result["targets"]["4-bit"]) >= {"decode_ratio", "prefill_ratio", "kernel_ratio"}
    json.dumps(result)
    console = Console(width=300, record=True)
    for table in result_tables(result, markdown=True):
        console.print(table)
    assert "| qwenmlx |" in console.export_text()


@pytest.mark.parametrize("args, message", [
    (["--bits", "four"], "--bits takes comma-separated integers"),
    (["--dtype", "int8"], "--dtype must be"),
    (["--config", "/nonexistent/config.json"], "no such config file"),
    (["--layers", "0"], "--layers must be at least 1"),
    (["--bits", "4,5"], "--bits: experts' bit widths are 4, 6"),
    (["--contexts", "8"], "--contexts must exceed"),
])
def test_bad_options_are_one_line_errors(args, message, tmp_path):
    result = CliRunner().invoke(app, ["bench", *args, "--workdir", str(tmp_path), "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) <= 2


def test_a_failed_measured_command_names_what_the_child_said():
    with pytest.raises(QwenMLXError, match="failed: the child's own last words"):
        measure_command([sys.executable, "-c", "import sys; sys.exit(\"the child's own last words\")"])


def test_memory_budget_bench_reports_each_budget_on_both_routings(tmp_path):
    config = tmp_path / "config.json"  # experts are most of the weights, so even 35% holds the minimum
    config.write_text(json.dumps({**tiny_raw(8), "num_experts": 32, "moe_intermediate_size": 128}))
    options = BenchOptions(layers=8, prompt_tokens=8, decode_tokens=4, bits=(4,), config=config,
                           workdir=tmp_path / "work")
    result = run_budget_bench(options)
    runs = result["memory_budget"]["runs"]
    assert [(r["share"], r["routing"], r["policy"], r["read_ahead"], r["overlap"]) for r in runs] == [
        *((s, routing, DEFAULT_POLICY, False, True) for s in (1.0, 0.75, 0.5, 0.35) for routing in ("uniform", "zipf")),
        *((s, routing, policy, False, True) for s in (0.5, 0.35) for routing in ("uniform", "zipf")
          for policy in ("global-lru", "lru", "lfu") if policy != DEFAULT_POLICY),
        *((0.5, routing, DEFAULT_POLICY, ahead, overlap) for routing in ("uniform", "zipf")
          for ahead, overlap in ((True, True), (False, True), (False, False)))]
    for r in runs:
        assert r["decode_tps"] > 0 and r["peak_rss_gb"] > 0 and 0 <= r["hit_rate"] <= 1 and 0 < r["top_tenth_share"] <= 1
        if r["budget"] is None:  # everything resident: nothing is read
            assert r["hit_rate"] == 1 and r["mb_read_per_token"] == 0
    console = Console(width=300, record=True)
    for table in budget_tables(result, markdown=True):
        console.print(table)
    assert "| zipf " in console.export_text()
