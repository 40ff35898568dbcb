"""Splitting a long text into parts that each fit a token budget, along the text's own structure.

Boundaries are tried coarsest first: Markdown headings (level 1, then 2, ... 6), blank lines between
paragraphs, line breaks, then sentence ends. A piece is cut at a finer boundary only when it alone is
over the budget, so every part ends at the largest boundary that works. Only a single sentence longer
than a whole part (minified code, a table without line breaks) is cut inside: between words, and
failing that between characters.

Parts are exact slices of the text, in order: "".join(parts) == text.
"""

import re
from collections.abc import Callable

HEADINGS = [re.compile(rf"(?m)^(?=#{{1,{level}}}[ \t])") for level in range(1, 7)]
PARAGRAPHS = re.compile(r"\n[ \t]*\n\s*")
LINES = re.compile(r"\n")
# Latin sentence ends need a following space ("3.5" is not one); CJK ones do not.
SENTENCES = re.compile(r"[.!?…][\"'”’)\]]*\s+|[。！？；][”’」』）]*\s*")
WORDS = re.compile(r"\s+")
BOUNDARIES = [*HEADINGS, PARAGRAPHS, LINES, SENTENCES, WORDS]


def split_text(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Consecutive slices of text, each at most max_tokens by count_tokens (a token count per piece)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    parts = []
    for part in _split(text, max_tokens, count_tokens, 0):
        # Packing sums the pieces' counts; joined, a few pieces can come out a token or two longer.
        excess = count_tokens(part) - max_tokens
        parts += [part] if excess <= 0 else split_text(part, max(max_tokens - excess, 1), count_tokens)
    return parts


def _split(text: str, max_tokens: int, count_tokens: Callable[[str], int], level: int) -> list[str]:
    n_tokens = count_tokens(text)
    if n_tokens <= max_tokens:
        return [text]
    if level == len(BOUNDARIES):
        return _split_characters(text, n_tokens, max_tokens, count_tokens)
    pieces = cut_at(text, BOUNDARIES[level])
    if len(pieces) == 1:
        return _split(text, max_tokens, count_tokens, level + 1)

    # Greedy packing, summing the pieces' counts.
    parts, current, current_tokens = [], "", 0
    for piece in pieces:
        piece_tokens = count_tokens(piece)
        if current and current_tokens + piece_tokens <= max_tokens:
            current, current_tokens = current + piece, current_tokens + piece_tokens
            continue
        if current:
            parts.append(current)
        if piece_tokens <= max_tokens:
            current, current_tokens = piece, piece_tokens
        else:
            *whole, last = _split(piece, max_tokens, count_tokens, level + 1)
            parts.extend(whole)
            current, current_tokens = last, count_tokens(last)  # the tail may share a part with what follows
    if current:
        parts.append(current)
    return parts


def cut_at(text: str, boundary: re.Pattern) -> list[str]:
    """Slices of text ending where each boundary match ends (the separator stays with the piece before it)."""
    cuts = sorted({m.end() for m in boundary.finditer(text)} - {0, len(text)})
    edges = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(edges, edges[1:])]


def _split_characters(text: str, n_tokens: int, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Last resort for one unbroken run of text: slices by characters, shrunk until each fits."""
    parts, start = [], 0
    chars_per_token = len(text) / n_tokens
    while start < len(text):
        size = max(1, int(max_tokens * chars_per_token))
        while size > 1 and count_tokens(text[start : start + size]) > max_tokens:
            size = size * 9 // 10
        parts.append(text[start : start + size])
        start += size
    return parts
