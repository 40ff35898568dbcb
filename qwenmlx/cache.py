"""KV caches: what each attention layer keeps of past tokens, and how it attends over them."""

import mlx.core as mx


class KVCache:
    """A growing cache, pre-allocated in steps so that decode does not reallocate every token."""

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0  # tokens held; also the RoPE position of the next token

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, n_kv_heads, L, head_dim = keys.shape
        if self.keys is None or self.offset + L > self.keys.shape[2]:
            n_steps = (self.offset + L + self.step - 1) // self.step
            shape = (B, n_kv_heads, n_steps * self.step, head_dim)
            new_keys, new_values = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
            if self.keys is not None:
                new_keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
                new_values[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = new_keys, new_values
        self.keys[..., self.offset : self.offset + L, :] = keys
        self.values[..., self.offset : self.offset + L, :] = values
        self.offset += L
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """Store the new keys/values, then attend causally over everything held."""
        keys, values = self.update_and_fetch(keys, values)
        mask = "causal" if queries.shape[2] > 1 else None  # aligned to the last key
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def trim(self, n: int) -> int:
        """Forget the last n tokens (prompt reuse); returns how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n


def make_cache(model) -> list[KVCache]:
    """One cache per decoder layer, in the order model(tokens, cache) expects."""
    return [KVCache() for _ in model.layers]
