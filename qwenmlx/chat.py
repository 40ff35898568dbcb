"""A conversation with the model: the message list, the KV cache of what was rendered from it, prompt reuse.

Every turn renders the whole message list with the model's chat template (so earlier thinking is
stripped and each turn ends exactly as Qwen3 was trained), then prefills only what differs from the
tokens the cache already holds: the longest common prefix stays, the rest of the cache is trimmed.
"""

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cache import KVCache, is_cache_file, load_caches, make_cache, save_caches, trim_to_shared_prefix
from .errors import QwenMLXError
from .generate import Stats, Step, check_generation, default_sampling, stream_generate

ANSWER_ROOM = 1024  # tokens kept free for the answer (at most a quarter of the window) when fitting the history


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
        check_generation(max_tokens, thinking_budget, prefill_step, **sampling)
        self.model, self.tokenizer = model, tokenizer
        self.thinking, self.max_tokens, self.thinking_budget = thinking, max_tokens, thinking_budget
        self.max_kv_size, self.kv_bits, self.prefill_step = max_kv_size, kv_bits, prefill_step
        self.sampling_overrides = sampling  # temperature, top_p, ... as the user gave them (None: default)
        self.system = system
        self.window = model.config.max_position_embeddings if max_kv_size is None else max_kv_size
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: list[dict] = []
        self.cache = make_cache(self.model, self.max_kv_size, self.kv_bits)
        self.cached_tokens: list[int] = []  # every token fed into the cache, in order (some may be evicted)
        self.last_turn: Turn | None = None

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def switch_thinking(self, on: bool) -> str:
        """/think or /no_think; the line that says what it does. A 2507 model's template decides alone, so there
        it changes nothing, which the line says."""
        self.thinking = on
        thinks_anyway = self.tokenizer.thinks(not on)
        if thinks_anyway == self.tokenizer.thinks(on):
            return (f"this model's thinking is fixed: it {'always' if thinks_anyway else 'never'} thinks, "
                    "whatever /think or /no_think say")
        return f"thinking {on_off(on)}"

    @property
    def context_used(self) -> int:
        """Tokens the cache holds now."""
        return self.cache[0].offset

    def render(self, messages: list[dict] | None = None) -> list[int]:
        """The prompt Qwen3's template makes of the message list, ending with the assistant's turn opening."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.apply_chat_template(system + (self.messages if messages is None else messages),
                                                  enable_thinking=self.thinking, tokenize=True)

    @property
    def answer_room(self) -> int:
        return min(self.max_tokens, ANSWER_ROOM, self.window // 4)

    def reply(self, user_text: str) -> Iterator[Step]:
        """Stream the answer to user_text; closing the iterator early (Ctrl-C) keeps what was said so far.

        A message the window cannot hold even alone is refused (QwenMLXError), the history untouched.
        """
        self._check_fits(user_text)
        self.messages.append({"role": "user", "content": user_text})
        turn = self.last_turn = Turn(interrupted=True)
        prompt, generated, text, steps = [], [], [], None
        try:
            prompt = self._fit_window(turn)
            reused = self._reuse_cache(prompt)
            turn.reused_tokens, turn.prefilled_tokens = reused, len(prompt) - reused
            evicted_before = self.cache[0].evicted
            sampling = default_sampling(self.tokenizer.thinks(self.thinking), self.tokenizer.generation_config,
                                        **self.sampling_overrides)
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

    def _check_fits(self, user_text: str) -> None:
        size = len(self.render([{"role": "user", "content": user_text}]))  # with the system prompt and template
        if size + self.answer_room > self.window:
            raise QwenMLXError(
                f"message not sent: it takes {size} tokens, and the context window holds "
                f"{self.window - self.answer_room} besides the {self.answer_room} kept for the answer; shorten it")

    def _fit_window(self, turn: Turn) -> list[int]:
        """Render the history; without a rotating cache, drop the oldest exchanges (never the system prompt) to fit."""
        prompt = self.render()
        if self.max_kv_size is not None:
            return prompt  # the rotating cache bounds the context itself
        while len(prompt) + self.answer_room > self.window and len(self.messages) > 1:
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
        """History as JSON at path; the KV cache (its tokens, the model that made it) next to it, as .kv.safetensors.

        Checked before any work: only a missing file or an earlier saved chat is replaced, and a failed
        save leaves nothing behind (both files are written to temporary names, then renamed).
        """
        self._check_whole("/save")
        path = Path(path)
        check_save_destination(path)
        history = {"system": self.system, "thinking": self.thinking, "messages": self.messages}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(history, ensure_ascii=False, indent=2))
            save_caches(cache_path(path), self.cache, {"tokens": self.cached_tokens, "model": self.cache_owner()})
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            Path(tmp).unlink(missing_ok=True)
            raise QwenMLXError(f"{path}: cannot write ({e})") from None
        return path

    def load(self, path: str | Path) -> list[str]:
        """Restore a saved chat's system prompt and messages, all or nothing; returns notes on what this session kept.

        The saved KV cache is used only when this model made it with this session's cache settings;
        otherwise it is dropped and the next turn prefills the history again. The session's own
        settings (thinking, cache bound and bits) stay as they are.
        """
        self._check_whole("/load")
        path = Path(path)
        history, notes = read_history(path), []
        caches, cached_tokens = None, []
        if cache_path(path).is_file():
            saved, metadata = load_caches(cache_path(path))
            check_cache_tokens(cache_path(path), saved, metadata)
            unusable = self._cannot_continue(saved, metadata)
            if unusable:
                notes.append(f"the saved KV cache {unusable}: dropped, the next turn prefills the history again")
            else:
                caches, cached_tokens = saved, metadata["tokens"]
        if history["system"] != self.system:
            notes.append("the system prompt is the saved chat's" if history["system"] else
                         "no system prompt, as in the saved chat")
        if history["thinking"] != self.thinking:
            notes.append(f"thinking stays {on_off(self.thinking)} (the chat was saved with it {on_off(history['thinking'])})")
        self.reset()
        self.messages, self.system = history["messages"], history["system"]
        if caches is not None:
            self.cache, self.cached_tokens = caches, cached_tokens
        return notes

    def _check_whole(self, command: str) -> None:
        if self.model.split is not None:
            raise QwenMLXError(f"{command} is not available while the model is split over ranks (mlx.launch): "
                               "each rank holds its own part of the KV cache")

    def cache_owner(self) -> dict:
        """What makes a KV cache's values: the checkpoint, and RoPE's scaling (which load() may override)."""
        return {"fingerprint": self.model.fingerprint, "rope_scaling": self.model.config.rope_scaling}

    def _cannot_continue(self, saved: list[KVCache], metadata: dict) -> str | None:
        """Why a saved cache cannot continue this session, in words; None when it can."""
        if self.model.fingerprint is None:
            return "cannot be matched to this model (not loaded from a checkpoint)"
        if metadata.get("model") != self.cache_owner():
            return "was made by another model"
        own = make_cache(self.model, self.max_kv_size, self.kv_bits)
        if [c.settings() for c in saved] != [c.settings() for c in own]:
            return f"is {saved[0].settings_in_words()}, this session's {own[0].settings_in_words()}"
        return None


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def cache_path(history_path: Path) -> Path:
    return history_path.with_name(history_path.name + ".kv.safetensors")


def read_history(path: Path) -> dict:
    """A saved chat's JSON, checked: a system prompt (or null), a thinking flag, and user/assistant messages."""
    not_a_chat = QwenMLXError(f"{path}: not a saved qwenmlx chat (expected JSON with system, thinking and messages)")
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise QwenMLXError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QwenMLXError(f"{path}: is a directory, not a saved chat") from None
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise not_a_chat from None
    if not (isinstance(history, dict) and isinstance(history.get("system"), (str, type(None)))
            and isinstance(history.get("thinking"), bool) and isinstance(history.get("messages"), list)):
        raise not_a_chat
    for i, message in enumerate(history["messages"]):
        if not (isinstance(message, dict) and message.keys() == {"role", "content"}
                and message["role"] in ("user", "assistant") and isinstance(message["content"], str)):
            raise QwenMLXError(f"{path}: message {i} is not a user or assistant message with text content")
    return history


def is_saved_chat(path: Path) -> bool:
    try:
        read_history(path)
    except QwenMLXError:
        return False
    return True


def check_save_destination(path: Path) -> None:
    """Refuse a directory, a missing or read-only folder, and any existing file that a save did not write."""
    for target in (path, cache_path(path)):
        if target.is_dir():
            raise QwenMLXError(f"{target}: is a directory (a chat is saved as a file)")
    if not path.parent.is_dir():
        raise QwenMLXError(f"{path.parent}: no such directory")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise QwenMLXError(f"{path.parent}: cannot write in this directory (permission denied)")
    if path.exists() and not is_saved_chat(path):
        raise QwenMLXError(f"{path}: exists and is not a saved qwenmlx chat (not replaced)")
    if cache_path(path).exists() and not is_cache_file(cache_path(path)):
        raise QwenMLXError(f"{cache_path(path)}: exists and is not a qwenmlx KV cache (not replaced)")


def check_cache_tokens(path: Path, caches: list[KVCache], metadata: dict) -> None:
    """Every layer holds as many tokens as the file lists (else continuing from it would break the chat)."""
    tokens = metadata.get("tokens")
    held = {c.offset + c.evicted for c in caches}
    if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) and held <= {len(tokens)}):
        raise QwenMLXError(f"{path}: corrupt KV cache (its layers and tokens disagree); remove it to load the history alone")
