"""Splitting a long text into parts that each fit a token budget, along the text's own structure.

Boundaries are tried coarsest first: Markdown headings (level 1, then 2, ... 6), blank lines between
paragraphs, line breaks, then sentence ends. A piece is cut at a finer boundary only when it alone is
over the budget, so every part ends at the largest boundary that works. Only a single sentence longer
than a whole part (minified code, a table without line breaks) is cut inside: between words, and
failing that between characters.

Parts are exact slices of the text, in order: "".join(parts) == text. The text is counted through its
TokenCounts, so a part's end is found by counting a few spans, never by tokenising the whole text again.
"""

import re
from bisect import bisect_right
from collections.abc import Callable, Iterator

from .token_counts import TokenCounts

HEADINGS = [re.compile(rf"(?m)^(?=#{{1,{level}}}[ \t])") for level in range(1, 7)]
PARAGRAPHS = re.compile(r"\n[ \t]*\n\s*")
LINES = re.compile(r"\n")
# Latin sentence ends need a following space ("3.5" is not one); CJK ones do not.
SENTENCES = re.compile(r"[.!?…][\"'”’)\]]*\s+|[。！？；][”’」』）]*\s*")
WORDS = re.compile(r"\s+")
BOUNDARIES = [*HEADINGS, PARAGRAPHS, LINES, SENTENCES, WORDS]


def split_text(counts: TokenCounts, max_tokens: int,
               on_progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Consecutive slices of counts.text, each at most max_tokens by counts.count; progress in characters placed."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    splitter = Splitter(counts, max_tokens, on_progress)
    if splitter.split(0, len(counts.text), 0) < len(counts.text):
        splitter.end_part(len(counts.text))
    text, edges = counts.text, [0, *splitter.ends]
    return [text[a:b] for a, b in zip(edges, edges[1:])]


class Splitter:
    """One split: the ends of the parts found so far, in order."""

    def __init__(self, counts: TokenCounts, max_tokens: int, on_progress: Callable[[int, int], None] | None):
        self.counts, self.max_tokens, self.on_progress = counts, max_tokens, on_progress
        self.ends: list[int] = []

    def end_part(self, end: int) -> None:
        self.ends.append(end)
        if self.on_progress:
            self.on_progress(end, len(self.counts.text))

    def fits(self, start: int, end: int) -> bool:
        return self.counts.count(start, end) <= self.max_tokens

    def split(self, start: int, end: int, level: int) -> int:
        """End the parts of text[start:end] but the last, at boundaries of this level or finer.

        The last part is left open, for what follows to join it if that fits: its start is returned.
        """
        if self.fits(start, end):
            return start
        if level == len(BOUNDARIES):
            return self.split_characters(start, end)
        boundary = BOUNDARIES[level]
        if not any(cut < end for cut in self.cuts(boundary, start, end, end)):
            return self.split(start, end, level + 1)
        part_start = start
        while True:
            # Greedy: the part runs to the farthest boundary it fits within; no span past `reach` can fit.
            reach = min(self.counts.reach(part_start, self.max_tokens), end)
            edges = [*self.cuts(boundary, part_start, end, reach), *([end] if reach == end else [])]
            part_end = self.farthest_fitting(part_start, edges)
            if part_end == end:
                return part_start
            if part_end is None:  # the next piece alone is over the budget: cut it finer
                piece_end = next(self.cuts(boundary, part_start, end, end), end)
                part_start = self.split(part_start, piece_end, level + 1)
            else:
                self.end_part(part_end)
                part_start = part_end

    def cuts(self, boundary: re.Pattern, start: int, end: int, until: int) -> Iterator[int]:
        """Where boundary matches end in text[start:end] (the separator stays with the piece before), up to until."""
        for match in boundary.finditer(self.counts.text, start, end):
            cut = match.end()
            if cut > until:
                return
            if start < cut:
                yield cut

    def farthest_fitting(self, start: int, edges: list[int]) -> int | None:
        """The last of the ascending edges that text[start:edge] fits within, by binary search; None if none does."""
        lo, hi = 0, len(edges)  # edges[:lo] fit, edges[hi:] do not
        while lo < hi:
            mid = (lo + hi) // 2
            if self.fits(start, edges[mid]):
                lo = mid + 1
            else:
                hi = mid
        return edges[lo - 1] if lo else None

    def split_characters(self, start: int, end: int) -> int:
        """Last resort for one unbroken run of text: slices by characters, each as long as fits (at least one)."""
        while not self.fits(start, end):
            reach = min(self.counts.reach(start, self.max_tokens), end)
            fitting = bisect_right(range(start + 2, reach + 1), False, key=lambda stop: not self.fits(start, stop))
            start += 1 + fitting
            self.end_part(start)
        return start
