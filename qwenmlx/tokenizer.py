"""Text <-> token ids for a Hugging Face model directory, and chat prompt rendering.

Encoding and decoding are delegated to the `tokenizers` library reading the model's
tokenizer.json. The chat template is rendered with jinja2 configured exactly as
transformers configures it, so prompts are byte-identical to what the model saw in
training-time tooling. Nothing from the model directory is ever executed as Python.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from qwenmlx.errors import QwenMLXError

# The named special tokens transformers hands to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_TEMPLATE_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    """Parse a JSON file, turning a syntax error into a one-line user-facing error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QwenMLXError(f"{path}: invalid JSON ({e})") from None


def _token_content(token: str | dict | None) -> str | None:
    """tokenizer_config.json stores a special token either as a string or as {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox, with the same helpers, as transformers."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """A model's tokenizer: encode/decode, stop tokens, and chat template rendering."""

    def __init__(self, hf_tokenizer: HFTokenizer, config: dict, chat_template: str | None, generation_config: dict):
        self._tokenizer = hf_tokenizer
        self.generation_config = generation_config
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.think_start_id = hf_tokenizer.token_to_id("<think>")
        self.think_end_id = hf_tokenizer.token_to_id("</think>")
        self._special_tokens = {
            name: _token_content(config[name]) for name in _TEMPLATE_SPECIAL_TOKENS if config.get(name) is not None
        }
        self.eos_token_ids = frozenset(self._stop_token_ids())
        self._chat_template = _compile_chat_template(chat_template) if chat_template is not None else None

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
            chat_template = template_file.read_text(encoding="utf-8")
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

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special tokens written in the text are recognised, no BOS is added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

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
    ) -> str | list[int]:
        """Render a conversation into the prompt format the model was trained on."""
        if self._chat_template is None:
            raise QwenMLXError("this model has no chat template (no chat_template.jinja or tokenizer_config.json entry)")
        try:
            prompt = self._chat_template.render(
                **self._special_tokens,
                messages=messages,
                tools=tools,
                documents=None,  # transformers always passes it; some templates test `documents is not none`
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
            )
        except jinja2.exceptions.TemplateError as e:
            raise QwenMLXError(f"chat template: {e}") from None
        return self.encode(prompt) if tokenize else prompt

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
