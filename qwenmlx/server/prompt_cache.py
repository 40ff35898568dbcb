"""KV caches kept across requests: an LRU bounded in bytes, searched by longest common prefix.

Every entry holds a cache and the tokens it was filled with. A request takes a copy of the entry
sharing most tokens with its prompt, trimmed to that prefix (`trim_to_shared_prefix`, as a chat
session does), so the entry stays valid for the next request. Entries are filed under a namespace
(the model and the cache settings): a lookup never looks outside its own.

Qwen3's template re-renders earlier answers without their thinking, so the tokens a reply was
generated after (its prompt) are a better prefix for the next turn than the prompt plus the reply.
Both are stored; they share memory (`copy_caches`) and are counted once.

Behind the memory sits a disk tier (`DiskCache`) that outlives the process: every prompt's cache is
also written there, one safetensors file per prompt, and a lookup that finds a longer shared prefix on
disk than in memory loads that file. A file is trusted only when it proves to be what its name and
index say (namespace, tokens, every layer holding them); anything else is skipped with a log line.
"""

import hashlib
import itertools
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..cache import KVCache, common_prefix_length, copy_caches, load_caches, save_caches, trim_to_shared_prefix
from ..checkpoint import safetensors_header
from ..errors import QwenMLXError
from ..hub import models_dir

log = logging.getLogger("qwenmlx.server")

DISK_MARKER = "qwenmlx_prompt_cache"  # in a disk entry's metadata: {"namespace": ..., "tokens": [...]}


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


def default_directory() -> Path:
    """Where `serve` keeps prompt caches on disk unless told: beside the models (hidden from `qwenmlx list`)."""
    return models_dir() / ".prompt-cache"


@dataclass
class DiskEntry:
    path: Path
    namespace: str
    tokens: list[int]
    nbytes: int


class DiskCache:
    """Prompt caches as safetensors files in one directory, bounded in bytes (least recently used removed).

    Files are named by a hash of namespace and tokens, written atomically (save_caches), and indexed
    from their headers at start. Only files this tier wrote (its marker in their metadata) are ever
    removed; a file that is corrupt, truncated or of another model is left alone and never loaded.
    """

    def __init__(self, directory: str | Path, max_bytes: int):
        """Create the directory if needed and index its files (all namespaces; only the caller's is ever loaded)."""
        if max_bytes < 0:
            raise QwenMLXError("--prompt-cache-disk-gb: must be 0 or more")
        self.directory, self.max_bytes = Path(directory).expanduser(), max_bytes
        self.entries: dict[Path, DiskEntry] = {}
        if max_bytes == 0:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QwenMLXError(f"--prompt-cache-dir {self.directory}: cannot create it ({e.strerror})") from None
        if not self.directory.is_dir() or not os.access(self.directory, os.W_OK):
            raise QwenMLXError(f"--prompt-cache-dir {self.directory}: not a writable directory")
        for path in sorted(self.directory.glob("*.safetensors")):
            entry = self._read_index(path)
            if entry is not None:
                self.entries[path] = entry
        log.info("prompt cache on disk: %s (%d entries)", self.directory, len(self.entries))

    def _read_index(self, path: Path) -> DiskEntry | None:
        try:
            metadata = safetensors_header(path).get("__metadata__", {})
            index = json.loads(metadata["qwenmlx_metadata"])[DISK_MARKER]
            namespace, tokens = index["namespace"], index["tokens"]
            if not isinstance(namespace, str) or not all(isinstance(t, int) for t in tokens):
                raise TypeError("a malformed index")
        except (QwenMLXError, KeyError, TypeError, ValueError) as e:
            log.warning("prompt cache: ignoring %s: not a prompt cache file (%s)", path, e)
            return None
        if path.name != self.file_name(namespace, tokens):
            log.warning("prompt cache: ignoring %s: its name does not match its contents", path)
            return None
        return DiskEntry(path, namespace, tokens, path.stat().st_size)

    @staticmethod
    def file_name(namespace: str, tokens: list[int]) -> str:
        digest = hashlib.sha256(json.dumps([namespace, tokens]).encode()).hexdigest()
        return f"{digest[:40]}.safetensors"

    def best(self, namespace: str, prompt: list[int]) -> tuple[DiskEntry | None, int]:
        """The entry sharing the longest prefix with the prompt, and how many tokens it shares."""
        best, shared = None, 0
        for entry in self.entries.values():
            n = common_prefix_length(entry.tokens, prompt)
            if entry.namespace == namespace and n > shared:
                best, shared = entry, n
        return best, shared

    def load(self, entry: DiskEntry) -> list[KVCache] | None:
        """The entry's caches, once the file proves to hold them; None (and a log line) otherwise."""
        try:
            caches, metadata = load_caches(entry.path)
            index = metadata.get(DISK_MARKER, {})
            if index.get("namespace") != entry.namespace or index.get("tokens") != entry.tokens:
                raise QwenMLXError("its contents changed since it was indexed")
            if not caches or any(c.offset + c.evicted != len(entry.tokens) for c in caches):
                raise QwenMLXError("its layers do not hold the tokens it names")
        except QwenMLXError as e:
            log.warning("prompt cache: ignoring %s (%s)", entry.path, e)
            del self.entries[entry.path]
            return None
        os.utime(entry.path)  # recently used
        return caches

    def store(self, namespace: str, tokens: list[int], caches: list[KVCache]) -> None:
        """Write caches holding `tokens`; entries of the namespace they extend are removed (they can serve by trim)."""
        if self.max_bytes == 0:
            return
        path = self.directory / self.file_name(namespace, tokens)
        if path in self.entries:
            os.utime(path)
            return
        try:
            save_caches(path, caches, {DISK_MARKER: {"namespace": namespace, "tokens": tokens}})
        except OSError as e:
            log.warning("prompt cache: cannot write %s (%s)", path, e)
            return
        for other in [e for e in self.entries.values()
                      if e.namespace == namespace and common_prefix_length(e.tokens, tokens) == len(e.tokens)]:
            self._remove(other)
        self.entries[path] = DiskEntry(path, namespace, tokens, path.stat().st_size)
        self._evict()

    def _evict(self) -> None:
        """Past the bound, remove this tier's own files, least recently used first (any namespace)."""
        total = sum(e.nbytes for e in self.entries.values())
        for entry in sorted(self.entries.values(), key=lambda e: e.path.stat().st_mtime):
            if total <= self.max_bytes:
                break
            total -= entry.nbytes
            self._remove(entry)

    def _remove(self, entry: DiskEntry) -> None:
        entry.path.unlink(missing_ok=True)
        self.entries.pop(entry.path, None)


class PromptCache:
    def __init__(self, max_bytes: int, disk: DiskCache | None = None):
        self.max_bytes, self.disk = max_bytes, disk
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
        """A copy of the entry sharing the longest prefix with the prompt, trimmed to that prefix.

        A disk entry sharing more than any in memory is loaded into memory first.
        """
        best, best_rank = None, (0, 0)
        for key, entry in self.entries.items():
            # The most shared tokens; of equals, the fewest held (a checkpoint rather than its reply).
            rank = (common_prefix_length(entry.tokens, prompt), -len(entry.tokens))
            if entry.namespace == namespace and rank > best_rank:
                best, best_rank = key, rank
        on_disk, shared = self.disk.best(namespace, prompt) if self.disk else (None, 0)
        if on_disk is not None and shared > best_rank[0] and (caches := self.disk.load(on_disk)) is not None:
            best = self._add(Entry(namespace, on_disk.tokens, caches, next(self._ids)))
        elif best is None:
            return Reuse(None, 0)
        self.entries.move_to_end(best)
        entry = self.entries[best]
        caches = copy_caches(entry.caches)
        reused = trim_to_shared_prefix(caches, entry.tokens, prompt)
        self._evict()
        return Reuse(None, 0) if not reused else Reuse(caches, reused)

    def store(self, namespace: str, held: list[int], caches: list[KVCache], prompt: list[int],
              checkpoint: list[KVCache] | None = None) -> None:
        """Keep caches holding `held` (the prompt, then the reply) and a checkpoint holding the prompt alone.

        Without a checkpoint (taken before the reply when the reply may evict), the caches' own buffers
        read up to the prompt serve as one. Entries the new caches can serve by trimming are dropped.
        """
        storage = checkpoint_storage = next(self._ids)
        if checkpoint is not None:
            checkpoint_storage = next(self._ids)
        elif not caches[0].evicted:
            checkpoint = copy_caches(caches)
            for c in checkpoint:
                c.trim(len(held) - len(prompt))
        if self.disk and checkpoint is not None:
            self.disk.store(namespace, prompt, checkpoint)
        if self.max_bytes <= 0:
            return
        if not caches[0].evicted:
            for key, entry in list(self.entries.items()):
                if entry.namespace == namespace and common_prefix_length(entry.tokens, held) == len(entry.tokens):
                    del self.entries[key]
        if checkpoint is not None and len(held) > len(prompt):
            self._add(Entry(namespace, prompt, checkpoint, checkpoint_storage))
        self._add(Entry(namespace, held, caches, storage))
        self._evict()

    def _add(self, entry: Entry) -> int:
        key = next(self._ids)
        self.entries[key] = entry
        return key

    def _evict(self) -> None:
        while self.entries and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
