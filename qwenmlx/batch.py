"""Decoding several sequences in one forward pass: each keeps its own KV caches, the weights are read once.

The model runs on a [B, 1] batch of next tokens as it runs on one sequence; only attention differs,
and `BatchCache` takes care of it: RoPE gets each row's own position (mx.fast.rope takes a vector of
offsets), and each row attends over its own cache, so sequences of different lengths never see each
other. Everything else (projections, norms, the router, the experts) is row by row already, so a
sequence's logits in a batch equal its logits alone up to the order of float additions in a matmul.
In the MoE layers the batch's tokens are routed together: their (token, expert) pairs are sorted
by expert, so each expert's weights are read once for all the rows that chose it.
"""

import mlx.core as mx

from .cache import KVCache
from .cpu_streams import NO_CORES, Cores


class BatchCache:
    """One layer's caches of several sequences, seen by the model as one cache over a batch."""

    def __init__(self, caches: list[KVCache]):
        self.caches = caches

    @property
    def offset(self) -> mx.array:
        """Each row's position: RoPE rotates row i at its own sequence's length."""
        return mx.array([c.offset for c in self.caches])

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, rope,
               cores: Cores = NO_CORES) -> mx.array:
        """Each row over its own cache. Several rows are spread over the cores' streams, a block of rows each,
        so each row is one attention call (a single row splits its heads over the streams instead)."""
        if len(self.caches) == 1:
            return self.caches[0].attend(queries, keys, values, scale, rope, cores)

        def rows(start: int, stop: int) -> mx.array:
            return mx.concatenate([self.caches[i].attend(queries[i : i + 1], keys[i : i + 1], values[i : i + 1],
                                                         scale, rope) for i in range(start, stop)], axis=0)

        return cores.blocks(len(self.caches), rows, axis=0)

def decodes_in_a_batch(model) -> bool:
    """Whether several sequences may share a step: BatchCache serves attention that rotates keys at their index.
    SelfExtend and dual chunk attention place each query and key themselves, from one sequence's length."""
    return all(layer.self_attn.rotated_keys for layer in model.layers)


def decode_step(model, tokens: list[int] | mx.array, caches: list[list[KVCache]]) -> mx.array:
    """The next-token logits [B, vocab] of B sequences, each given its next token and its own caches (one per layer).

    Every sequence's caches grow by its token, as they would had it run alone; one sequence runs exactly so.
    """
    if len(caches) == 1:
        return model(mx.array(tokens).reshape(1, 1), caches[0])[:, -1, :]
    per_layer = [BatchCache([sequence[i] for sequence in caches]) for i in range(len(model.layers))]
    return model(mx.array(tokens).reshape(-1, 1), per_layer)[:, -1, :]
