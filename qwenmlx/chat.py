"""A conversation with the model: the message list, the KV cache of what was rendered from it, prompt reuse.

Every turn renders the whole message list with the model's chat template (so earlier thinking is
stripped and each turn ends exactly as Qwen3 was trained), then prefills only what differs from the
tokens the cache already holds: the longest common prefix stays, the rest of the cache is trimmed.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cache import load_caches, make_cache, save_caches, trim_to_shared_prefix
from .errors import QwenMLXError
from .generate import Stats, Step, default_sampling, stream_generate

ANSWER_ROOM = 1024  # tokens kept free for the answer when deciding whether the history still fits


@dataclass
class Turn:
    """What one reply cost and what happened to the context to make room for it."""

    reused_tokens: int = 0
    prefilled_tokens: int = 0
    dropped_turns: int = 0  # oldest exchanges removed from the history to fit the window
    evicted_tokens: int = 0  # tokens the rotating cache dropped during this turn
    interrupted: bool = False
    stats: Stats = field(default_factory=Stats)


class ChatSession:
    """A multi-turn chat; `reply` streams the answer and keeps the history and the cache in step."""

    def __init__(self, model, tokenizer, *, system: str | None = None, thinking: bool = True,
                 max_kv_size: int | None = None, kv_bits: int | None = None, max_tokens: int = 4096,
                 thinking_budget: int | None = None, prefill_step: int | None = None, **sampling):
        self.model, self.tokenizer = model, tokenizer
        self.thinking, self.max_tokens, self.thinking_budget = thinking, max_tokens, thinking_budget
        self.max_kv_size, self.kv_bits, self.prefill_step = max_kv_size, kv_bits, prefill_step
        self.sampling_overrides = sampling  # temperature, top_p, ... as the user gave them (None: default)
        self.system = system
        self.window = max_kv_size or model.config.max_position_embeddings
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: list[dict] = []
        self.cache = make_cache(self.model, self.max_kv_size, self.kv_bits)
        self.cached_tokens: list[int] = []  # every token fed into the cache, in order (some may be evicted)
        self.last_turn: Turn | None = None

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    @property
    def context_used(self) -> int:
        """Tokens the cache holds now."""
        return self.cache[0].offset

    def render(self, messages: list[dict] | None = None) -> list[int]:
        """The prompt Qwen3's template makes of the message list, ending with the assistant's turn opening."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.apply_chat_template(system + (self.messages if messages is None else messages),
                                                  enable_thinking=self.thinking, tokenize=True)

    def reply(self, user_text: str) -> Iterator[Step]:
        """Stream the answer to user_text; closing the iterator early (Ctrl-C) keeps what was said so far."""
        self.messages.append({"role": "user", "content": user_text})
        turn = self.last_turn = Turn(interrupted=True)
        prompt, generated, text, steps = [], [], [], None
        try:
            prompt = self._fit_window(turn)
            reused = self._reuse_cache(prompt)
            turn.reused_tokens, turn.prefilled_tokens = reused, len(prompt) - reused
            evicted_before = self.cache[0].evicted
            sampling = default_sampling(self.thinking, self.tokenizer.generation_config, **self.sampling_overrides)
            steps = stream_generate(self.model, self.tokenizer, prompt[reused:], cache=self.cache,
                                    sampling=sampling, max_tokens=self.max_tokens,
                                    thinking_budget=self.thinking_budget, prefill_step=self.prefill_step)
            for step in steps:
                generated.append(step.token)
                text.append(step.text)
                turn.stats = step.stats
                yield step
            turn.interrupted = False
        finally:
            if steps is not None:
                steps.close()
                turn.evicted_tokens = self.cache[0].evicted - evicted_before
                # The cache holds a prefix of prompt + answer (generation never feeds its last token).
                self.cached_tokens = (prompt + generated)[: self.cache[0].offset + self.cache[0].evicted]
            self.messages.append({"role": "assistant", "content": "".join(text)})

    def _fit_window(self, turn: Turn) -> list[int]:
        """Render the history; without a rotating cache, drop the oldest exchanges (never the system prompt) to fit."""
        prompt = self.render()
        if self.max_kv_size:
            return prompt  # the rotating cache bounds the context itself
        while len(prompt) + min(self.max_tokens, ANSWER_ROOM) > self.window and len(self.messages) > 1:
            first_reply = next((i for i, m in enumerate(self.messages) if i > 0 and m["role"] == "user"), None)
            if first_reply is None:
                break
            del self.messages[:first_reply]
            turn.dropped_turns += 1
            prompt = self.render()
        return prompt

    def _reuse_cache(self, prompt: list[int]) -> int:
        """Trim the cache back to the longest prefix it shares with the prompt; returns how many tokens are reused."""
        shared = trim_to_shared_prefix(self.cache, self.cached_tokens, prompt)
        if shared is None:  # the divergence point was evicted: start over
            self.cache = make_cache(self.model, self.max_kv_size, self.kv_bits)
            self.cached_tokens = []
            return 0
        self.cached_tokens = self.cached_tokens[:shared]
        return shared

    def save(self, path: str | Path) -> Path:
        """History as JSON at path; the KV cache (with the tokens it holds) next to it, as .kv.safetensors."""
        path = Path(path)
        history = {"system": self.system, "thinking": self.thinking, "messages": self.messages}
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(history, ensure_ascii=False, indent=2))
            save_caches(cache_path(path), self.cache, {"tokens": self.cached_tokens})
            tmp.replace(path)
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            raise QwenMLXError(f"{path}: cannot write ({e})") from None
        return path

    def load(self, path: str | Path) -> None:
        """Restore a saved chat; its cache is used when it belongs to this model, else the next turn re-prefills."""
        path = Path(path)
        try:
            history = json.loads(path.read_text())
            messages, system, thinking = history["messages"], history["system"], history["thinking"]
        except FileNotFoundError:
            raise QwenMLXError(f"{path}: no such file") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise QwenMLXError(f"{path}: not a saved qwenmlx chat (expected JSON with messages)") from None
        self.reset()
        self.messages, self.system, self.thinking = messages, system, thinking
        if cache_path(path).is_file():
            caches, metadata = load_caches(cache_path(path))
            if len(caches) == len(self.model.layers):
                self.cache, self.cached_tokens = caches, metadata["tokens"]


def cache_path(history_path: Path) -> Path:
    return history_path.with_name(history_path.name + ".kv.safetensors")
