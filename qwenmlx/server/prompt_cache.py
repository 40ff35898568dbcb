"""KV caches kept across requests: an LRU bounded in bytes, searched by longest common prefix.

Every entry holds a cache and the tokens it was filled with. A request takes a copy of the entry
sharing most tokens with its prompt, trimmed to that prefix (`trim_to_shared_prefix`, as a chat
session does), so the entry stays valid for the next request. Entries are filed under a namespace
(the model and the cache settings): a lookup never looks outside its own.

Qwen3's template re-renders earlier answers without their thinking, so the tokens a reply was
generated after (its prompt) are a better prefix for the next turn than the prompt plus the reply.
Both are stored; they share memory (`copy_caches`) and are counted once.
"""

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from ..cache import KVCache, common_prefix_length, copy_caches, trim_to_shared_prefix


@dataclass
class Entry:
    namespace: str
    tokens: list[int]
    caches: list[KVCache]
    storage: int  # entries with the same storage share their buffers

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


@dataclass
class Reuse:
    """What a request starts from: caches holding the first `reused` tokens of its prompt (maybe none)."""

    caches: list[KVCache] | None
    reused: int


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._ids = itertools.count()

    @property
    def nbytes(self) -> int:
        """Memory held: each storage counted once, at its largest entry."""
        by_storage: dict[int, int] = {}
        for e in self.entries.values():
            by_storage[e.storage] = max(by_storage.get(e.storage, 0), e.nbytes)
        return sum(by_storage.values())

    def fetch(self, namespace: str, prompt: list[int]) -> Reuse:
        """A copy of the entry sharing the longest prefix with the prompt, trimmed to that prefix."""
        best, best_rank = None, (0, 0)
        for key, entry in self.entries.items():
            # The most shared tokens; of equals, the fewest held (a checkpoint rather than its reply).
            rank = (common_prefix_length(entry.tokens, prompt), -len(entry.tokens))
            if entry.namespace == namespace and rank > best_rank:
                best, best_rank = key, rank
        if best is None:
            return Reuse(None, 0)
        self.entries.move_to_end(best)
        entry = self.entries[best]
        caches = copy_caches(entry.caches)
        reused = trim_to_shared_prefix(caches, entry.tokens, prompt)
        return Reuse(None, 0) if not reused else Reuse(caches, reused)

    def store(self, namespace: str, held: list[int], caches: list[KVCache], prompt: list[int],
              checkpoint: list[KVCache] | None = None) -> None:
        """Keep caches holding `held` (the prompt, then the reply) and a checkpoint holding the prompt alone.

        Without a checkpoint (taken before the reply when the reply may evict), the caches' own buffers
        read up to the prompt serve as one. Entries the new caches can serve by trimming are dropped.
        """
        if self.max_bytes <= 0:
            return
        storage = checkpoint_storage = next(self._ids)
        if checkpoint is not None:
            checkpoint_storage = next(self._ids)
        elif not caches[0].evicted:
            checkpoint = copy_caches(caches)
            for c in checkpoint:
                c.trim(len(held) - len(prompt))
        if not caches[0].evicted:
            for key, entry in list(self.entries.items()):
                if entry.namespace == namespace and common_prefix_length(entry.tokens, held) == len(entry.tokens):
                    del self.entries[key]
        if checkpoint is not None and len(held) > len(prompt):
            self.entries[next(self._ids)] = Entry(namespace, prompt, checkpoint, checkpoint_storage)
        self.entries[next(self._ids)] = Entry(namespace, held, caches, storage)
        self._evict()

    def _evict(self) -> None:
        while self.entries and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
