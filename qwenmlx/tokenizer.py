"""Text <-> token ids for a Hugging Face model directory, and chat prompt rendering.

Encoding and decoding are delegated to the `tokenizers` library reading the model's
tokenizer.json. The chat template is rendered with jinja2 configured as transformers
configures it (chat_template.py), so prompts are byte-identical to what the model saw in
training-time tooling. Nothing from the model directory is ever executed as Python.

Text from users and documents is only text: a special token written in it (`<|im_start|>`)
is encoded as the characters it is made of, so a document cannot open a turn of its own.
Only the markers the chat template itself writes become special tokens.
"""

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from qwenmlx.chat_template import ChatTemplate
from qwenmlx.errors import QwenMLXError

# The named special tokens transformers hands to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_TEMPLATE_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# While a template renders, a special token written in the messages stands in as a placeholder made of two
# Unicode noncharacters (reserved for a program's internal use) around its index; put back after rendering.
PLACEHOLDER_OPEN, PLACEHOLDER_CLOSE = "\ufdd0", "\ufdd1"
PLACEHOLDER = re.compile(f"{PLACEHOLDER_OPEN}(\\d+){PLACEHOLDER_CLOSE}")
# Long texts are encoded in pieces, for progress. Safe cuts: after a line break, before a non-space. No
# pre-token of Qwen's tokenizer spans one, so the pieces' ids join up to exactly the whole text's ids.
ENCODE_PIECE_CHARS = 32_768
ENCODE_CUTS = re.compile(r"\n(?=\S)")


def _read_json(path: Path) -> dict:
    """Parse a JSON file, turning a syntax error into a one-line user-facing error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QwenMLXError(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise QwenMLXError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _token_content(token: str | dict | None) -> str | None:
    """tokenizer_config.json stores a special token either as a string or as {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


class Tokenizer:
    """A model's tokenizer: encode/decode, stop tokens, and chat template rendering."""

    def __init__(self, hf_tokenizer: HFTokenizer, config: dict, chat_template: str | None, generation_config: dict):
        self._tokenizer = hf_tokenizer
        hf_tokenizer.encode_special_tokens = True  # special tokens written in text are text (see module doc)
        self.generation_config = generation_config
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.think_start_id = hf_tokenizer.token_to_id("<think>")
        self.think_end_id = hf_tokenizer.token_to_id("</think>")
        self._special_tokens = {
            name: _token_content(config[name]) for name in _TEMPLATE_SPECIAL_TOKENS if config.get(name) is not None
        }
        self.eos_token_ids = frozenset(self._stop_token_ids())
        self._special_ids = {t.content: i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        # What a placeholder can stand for: a special token, or one of the placeholder's own characters.
        self._shielded = [*self._special_ids, PLACEHOLDER_OPEN, PLACEHOLDER_CLOSE]
        self._placeholders = {text: f"{PLACEHOLDER_OPEN}{i}{PLACEHOLDER_CLOSE}" for i, text in enumerate(self._shielded)}
        self._shielded_pattern = re.compile("|".join(map(re.escape, sorted(self._shielded, key=len, reverse=True))))
        self._special_pattern = re.compile(
            "(" + "|".join(map(re.escape, sorted(self._special_ids, key=len, reverse=True))) + ")"
        ) if self._special_ids else None
        self._chat_template = ChatTemplate(chat_template) if chat_template is not None else None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load from a Hugging Face model directory (tokenizer.json is required, the rest optional)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise QwenMLXError(f"{tokenizer_file}: not found (the model directory needs a tokenizer.json)")
        try:
            hf_tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises bare Exception for every parse error
            raise QwenMLXError(f"{tokenizer_file}: not a valid tokenizer file ({e})") from None

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        # Like transformers, a standalone chat_template.jinja wins over the one embedded in the config.
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            try:
                chat_template = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise QwenMLXError(f"chat template {template_file}: not UTF-8 text ({e.reason} at byte {e.start})"
                                   ) from None
        else:
            chat_template = config.get("chat_template")
        generation_file = path / "generation_config.json"
        generation_config = _read_json(generation_file) if generation_file.is_file() else {}
        return cls(hf_tokenizer, config, chat_template, generation_config)

    def _stop_token_ids(self) -> set[int]:
        """generation_config's eos_token_id (int or list) plus the tokenizer's eos_token: either one ends a reply."""
        eos = self.generation_config.get("eos_token_id")
        ids = set(eos) if isinstance(eos, list) else {eos}
        ids.add(self._tokenizer.token_to_id(self._special_tokens.get("eos_token", "")))
        return ids - {None}

    def encode(self, text: str, on_progress: Callable[[int, int], None] | None = None) -> list[int]:
        """Token ids for text; special tokens written in it are text like the rest, no BOS is added.

        A long text is encoded a piece at a time, and on_progress(characters done, characters in all)
        is called after each piece.
        """
        ids, start = [], 0
        for cut in [*(m.end() for m in ENCODE_CUTS.finditer(text)), len(text)]:
            if cut - start < ENCODE_PIECE_CHARS and cut < len(text):
                continue
            ids += self._tokenizer.encode(text[start:cut], add_special_tokens=False).ids
            start = cut
            if on_progress:
                on_progress(start, len(text))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        tokenize: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> str | list[int]:
        """Render a conversation into the prompt format the model was trained on (its ids, with tokenize).

        Only the template's own markers become special tokens. on_progress: as for encode, over the whole prompt.
        """
        if self._chat_template is None:
            raise QwenMLXError("this model has no chat template (no chat_template.jinja or tokenizer_config.json entry)")
        prompt = self._chat_template.render(
            **self._special_tokens,
            messages=self._shield(messages),
            tools=self._shield(tools),
            documents=None,  # transformers always passes it; some templates test `documents is not none`
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        if not prompt:
            raise QwenMLXError("chat template: renders nothing for these messages")
        return self._encode_prompt(prompt, on_progress) if tokenize else self._unshield(prompt)

    def thinks(self, requested: bool) -> bool:
        """Whether the model thinks when thinking is `requested`: Qwen3's template follows the request, the 2507
        models' decide alone (Thinking-2507 opens <think> in every prompt, Instruct-2507 never thinks)."""
        return requested if self._fixed_thinking is None else self._fixed_thinking

    @functools.cached_property
    def _fixed_thinking(self) -> bool | None:
        """None where the template follows enable_thinking, else whether it always thinks: two renders, done once
        (every chat turn and server request asks)."""
        if self._chat_template is None:
            return None
        on, off = (self.apply_chat_template([{"role": "user", "content": "x"}], enable_thinking=flag)
                   for flag in (True, False))
        return None if on != off else on.rstrip().endswith("<think>")

    def _shield(self, value):
        """value (messages, tools) with every special token in its strings replaced by a placeholder."""
        if isinstance(value, str):
            return self._shielded_pattern.sub(lambda m: self._placeholders[m[0]], value)
        if isinstance(value, dict):
            return {key: self._shield(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._shield(item) for item in value]
        return value

    def _unshield(self, text: str) -> str:
        return PLACEHOLDER.sub(lambda m: self._shielded[int(m[1])], text)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of a whole prompt its writer formatted for the model (a server's raw completion prompt): the special
        tokens written in it are markers, as the model's template would write them; the text between is text."""
        ids = []
        for i, piece in enumerate(self._special_pattern.split(prompt) if self._special_pattern else [prompt]):
            ids += [self._special_ids[piece]] if i % 2 else self.encode(piece)
        return ids

    def _encode_prompt(self, prompt: str, on_progress: Callable[[int, int], None] | None) -> list[int]:
        """Ids of a rendered prompt: its special tokens (all the template's own) as such, the text between as text."""
        pieces = self._special_pattern.split(prompt) if self._special_pattern else [prompt]
        pieces = [piece if i % 2 else self._unshield(piece) for i, piece in enumerate(pieces)]
        ids, done, total = [], 0, sum(map(len, pieces))
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self._special_ids[piece])
            elif piece:
                ids += self.encode(piece, on_progress and (lambda n, _, start=done: on_progress(start + n, total)))
            done += len(piece)
        if on_progress:
            on_progress(total, total)
        return ids

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns ids into text one at a time during generation.

    A byte-level BPE token can end halfway through a multi-byte UTF-8 character
    (Chinese, emoji). Ids since the last complete character are kept pending and
    re-decoded together; while the decoded text ends in U+FFFD the character is
    incomplete, so nothing is emitted yet.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pending: list[int] = []
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        self._pending.append(token_id)
        chunk = self._tokenizer.decode(self._pending)
        if chunk.endswith("\ufffd"):
            return ""
        return self._emit(chunk)

    def finalize(self) -> str:
        """Flush whatever is pending; bytes that never formed a character become U+FFFD."""
        return self._emit(self._tokenizer.decode(self._pending)) if self._pending else ""

    def _emit(self, chunk: str) -> str:
        self._pending = []
        self.text += chunk
        return chunk
