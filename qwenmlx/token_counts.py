"""Counting the tokens of a long text a bounded piece at a time, so that any span's count comes cheap.

Qwen's pre-tokenizer never joins a line break to a following non-space, nor a non-space to a following
space and letter (" word"), so cutting the text there changes no token: the pieces' counts add up to the
whole text's. Short pieces keep each tokenizer call short, so progress moves, Ctrl-C is acted on at once,
and no call builds millions of ids.
"""

import re
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator

PIECE_CHARS = 256  # short, as a span's count tokenises up to a piece at either end
# A count cuts anyway after this many characters without a safe cut (CJK without line breaks, minified
# code); the count of a span across such a cut may be a token off, which the split's margin absorbs.
MAX_PIECE_CHARS = 8 * PIECE_CHARS
SAFE_CUTS = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?= [^\W\d_])")


def piece_ends(text: str) -> Iterator[int]:
    """Where to cut text into pieces of about PIECE_CHARS: at safe cuts, or after MAX_PIECE_CHARS when none comes."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        limit = min(start + MAX_PIECE_CHARS, len(text))
        cut = SAFE_CUTS.search(text, start + PIECE_CHARS, limit)
        start = cut.start() if cut else limit
        yield start
    if start < len(text):
        yield len(text)


class TokenCounts:
    """A text's token count piece by piece, kept so that a span is counted by tokenising only its two end pieces.

    Only counts are kept, never ids: two numbers per piece, about 3 MB for a 50 MB document.
    """

    def __init__(self, tokenizer, text: str, on_progress: Callable[[int, int], None] | None = None):
        self.text, self.encode = text, tokenizer.encode
        self.bounds, self.before = array("q", [0]), array("q", [0])  # piece boundaries; the tokens before each
        self.last_head = (-1, 0)  # (start, tokens from start to the next boundary) of the last span counted
        for end in piece_ends(text):
            self.before.append(self.before[-1] + self.encoded(self.bounds[-1], end))
            self.bounds.append(end)
            if on_progress:
                on_progress(end, len(text))

    @property
    def total(self) -> int:
        return self.before[-1]

    def encoded(self, start: int, end: int) -> int:
        return len(self.encode(self.text[start:end])) if end > start else 0

    def count(self, start: int, end: int) -> int:
        """Tokens of text[start:end]: the whole pieces inside from the table, the partial ones at either end tokenised."""
        first = bisect_left(self.bounds, start)  # the first boundary at or after start
        last = bisect_right(self.bounds, end) - 1  # the last one at or before end
        if first >= last:
            return self.encoded(start, end)
        middle = self.before[last] - self.before[first]
        return self.head(start, self.bounds[first]) + middle + self.encoded(self.bounds[last], end)

    def head(self, start: int, boundary: int) -> int:
        """Tokens from start to the boundary after it, kept: a split counts many spans from one start."""
        if self.last_head[0] != start:
            self.last_head = (start, self.encoded(start, boundary))
        return self.last_head[1]

    def reach(self, start: int, max_tokens: int) -> int:
        """A position from which on no span beginning at start counts max_tokens or fewer."""
        first = bisect_left(self.bounds, start)
        over = bisect_right(self.before, self.before[first] + max_tokens)  # whole pieces alone exceed max_tokens
        return self.bounds[over] if over < len(self.bounds) else len(self.text)
