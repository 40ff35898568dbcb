"""One rank of a test run under mlx.launch (tests/test_distributed.py): it writes what it saw to OUT_DIR/rank<N>.json.

Usage: distributed_rank.py MODEL_DIR MODE OUT_DIR [OPTIONS_JSON]. OPTIONS_JSON may hold kv_bits, max_kv_size
rope_scaling and self_extend (as in one process: see greedy_tokens), temperature (sampled from a random state of each
rank's own), prompt_repeats (a longer prompt), available_memory (the free memory each rank's machine
reports, by rank) and fail_rank: the rank that raises after loading.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwenmlx import generate
from qwenmlx.cache import make_cache
from qwenmlx.distributed import join, load_sharded, peers_lost_as_errors
from qwenmlx.generate import GREEDY, Sampling, generate_tokens

PROMPT = [9707, 11, 1879, 0, 358, 1079, 264, 1273, 13]
NEW_TOKENS = 12


def greedy_tokens(model, kv_bits: int | None = None, max_kv_size: int | None = None,
                  sampling: Sampling = GREEDY, prompt: list[int] = PROMPT) -> list[int]:
    cache = make_cache(model, max_kv_size, kv_bits)
    return [token for token, _ in generate_tokens(model, prompt, cache=cache, sampling=sampling,
                                                  max_tokens=NEW_TOKENS)]


def main(model_dir: str, mode: str, out_dir: str, options: str = "{}") -> None:
    options = json.loads(options)
    ranks = join(mode)
    if "available_memory" in options:  # what this rank's machine says it has free
        generate.available_memory = lambda: options["available_memory"][ranks.rank]
    with peers_lost_as_errors(ranks):
        model = load_sharded(Path(model_dir), ranks, rope_scaling=options.get("rope_scaling"),
                             self_extend=options.get("self_extend"))
        loaded_bytes = mx.get_active_memory()
        if options.get("fail_rank") == ranks.rank:
            raise SystemExit(f"rank {ranks.rank} fails on purpose")
        sampling = GREEDY
        if "temperature" in options:  # each rank its own random state: rank 0's tokens must still win
            mx.random.seed(ranks.rank)
            sampling = Sampling(temperature=options["temperature"])
        prompt = PROMPT * options.get("prompt_repeats", 1)
        tokens = greedy_tokens(model, options.get("kv_bits"), options.get("max_kv_size"), sampling, prompt)
    facts = {"rank": ranks.rank, "size": ranks.size, "tokens": tokens, "loaded_bytes": loaded_bytes,
             "weight_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
             "layer_bytes": sum(v.nbytes for _, v in tree_flatten([layer.parameters() for layer in model.layers]))}
    (Path(out_dir) / f"rank{ranks.rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:])
