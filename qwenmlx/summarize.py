"""Summarising a document of any length in one call: the library behind `qwenmlx summarize`.

    summary = summarize(model, tokenizer, read_document("report.pdf"), SummaryOptions(style="bullets"))

The text is tokenised and counted first, a bounded piece at a time (token_counts.py); strategy.py then
says whether the prompt fits the native window, needs YaRN (switched on for this run only), or must be
summarised in parts. In parts (map-reduce), the text is split along its structure (splitting.py) by its
counts, each part is summarised in order, and the joined part summaries are summarised the same way,
again in parts if they are still too long.
"""

import re
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from .cache import make_cache
from .config import QWEN_DUAL_CHUNK, ModelConfig
from .documents import Document
from .errors import QwenMLXError
from .generate import THINKING_BUDGET_TEXT, Stats, Step, default_sampling, stream_generate
from .splitting import split_text
from .strategy import MAP_REDUCE, Limits, Plan, choose_strategy, limits_for, native_context, yarn_scaling
from .token_counts import TokenCounts

STYLES = {
    "brief": "Write a brief summary: one paragraph of three to five sentences with the main point and the "
             "most important facts.",
    "detailed": "Write a detailed summary: several paragraphs covering every main point, argument, number and "
                "conclusion, in the order the document gives them.",
    "bullets": "Write the summary as a Markdown bullet list of the key points, one point per bullet, in the "
               "order the document gives them.",
}
LANGUAGES = {
    "en": "English", "zh": "Chinese (简体中文)", "zh-tw": "Traditional Chinese (繁體中文)", "ja": "Japanese",
    "ko": "Korean", "fr": "French", "de": "German", "es": "Spanish", "pt": "Portuguese", "it": "Italian",
    "nl": "Dutch", "ru": "Russian", "uk": "Ukrainian", "pl": "Polish", "tr": "Turkish", "ar": "Arabic",
    "he": "Hebrew", "hi": "Hindi", "th": "Thai", "vi": "Vietnamese", "id": "Indonesian",
}
# Scripts that name the language outright; Latin-script languages are left to the model to recognise.
SCRIPT_LANGUAGES = [
    ("ja", re.compile(r"[\u3040-\u30ff]")), ("ko", re.compile(r"[\uac00-\ud7af]")),
    ("zh", re.compile(r"[\u4e00-\u9fff]")), ("ru", re.compile(r"[\u0400-\u04ff]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")), ("he", re.compile(r"[\u0590-\u05ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")), ("th", re.compile(r"[\u0e00-\u0e7f]")),
]
LANGUAGE_SAMPLE_CHARS = 20_000
# The text and the prompt around it, counted apart, are within this many tokens of the whole prompt (tokens
# can merge where they join). A prompt that may fit one generation is tokenised whole, to know exactly.
PROMPT_COUNT_SLACK = 2
# A part's prompt is the part stripped inside the template, and counts may be a token off where a long
# run had no safe cut: keep a little room for the difference.
SPLIT_MARGIN = 0.98
PART_SUMMARY_SHARE = 8  # a part's summary gets at most this fraction (1/8) of the native window


def detect_language(text: str) -> str | None:
    """The language code a non-Latin script gives away (Japanese if any kana, else Chinese for Han), or None."""
    sample = text[:LANGUAGE_SAMPLE_CHARS]
    letters = sum(ch.isalpha() for ch in sample) or 1
    for code, script in SCRIPT_LANGUAGES:
        share = len(script.findall(sample)) / letters
        if share > (0.05 if code == "ja" else 0.2):
            return code
    return None


@dataclass
class SummaryOptions:
    style: str = "brief"
    lang: str = "auto"  # "auto": the document's language
    max_tokens: int = 1024  # the summary's length; the thinking, when on, gets as many again
    think: bool = False
    seed: int | None = None

    def check(self) -> None:
        if self.style not in STYLES:
            raise QwenMLXError(f"--style {self.style}: unknown style (choose from {', '.join(STYLES)})")
        if self.lang != "auto" and self.lang.lower() not in LANGUAGES:
            raise QwenMLXError(f"--lang {self.lang}: unknown language code (auto, {', '.join(LANGUAGES)})")
        if self.max_tokens < 1:
            raise QwenMLXError(f"--max-tokens {self.max_tokens}: must be at least 1")

    def language_instruction(self, text: str) -> str:
        code = detect_language(text) if self.lang == "auto" else self.lang.lower()
        if code is None:
            return "Write it in the language the document is written in."
        if self.lang == "auto":
            return f"Write it in {LANGUAGES[code]}, the language of the document."
        return f"Write it in {LANGUAGES[code]}."


class SummaryProgress:
    """What a run reports as it goes. This one ignores it all; the CLI draws it with rich, tests record it.

    Each level of a run tokenises its text, plans, and either generates the summary or splits the text and
    summarises the parts (map steps, then mapped).
    """

    def tokenizing(self, done_chars: int, total_chars: int) -> None: ...

    def planned(self, plan: Plan, level: int) -> None: ...

    def splitting(self, done_chars: int, total_chars: int) -> None: ...

    def map_step(self, level: int, index: int, total: int, part: str) -> None: ...

    def mapped(self, level: int, total: int) -> None: ...

    def prefill(self, done: int, total: int) -> None: ...

    def thinking(self, n_tokens: int) -> None: ...

    def answer(self, text: str) -> None: ...


@dataclass
class PartSummary:
    """One map step: a slice [start, end) of the level's text and what the model made of it."""

    level: int  # 0: the document; 1: the joined part summaries of level 0; ...
    index: int
    start: int
    end: int
    prompt_tokens: int
    summary: str


@dataclass
class Summary:
    text: str
    strategy: str  # of the whole run: SINGLE_PASS, YARN or MAP_REDUCE
    yarn_factor: int | None  # of the final generation
    document_tokens: int
    plans: list[Plan]  # the decision at each level, in order
    parts: list[PartSummary] = field(default_factory=list)
    generated_tokens: int = 0
    seconds: dict = field(default_factory=dict)  # tokenize, prefill, decode, total
    final_stats: Stats | None = None
    peak_memory_gb: float = 0.0

    def to_dict(self) -> dict:
        return {
            "summary": self.text, "strategy": self.strategy, "yarn_factor": self.yarn_factor,
            "document_tokens": self.document_tokens, "generated_tokens": self.generated_tokens,
            "levels": len(self.plans), "plans": [p.to_dict() for p in self.plans],
            "parts": [asdict(p) for p in self.parts],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "final": self.final_stats.to_dict() if self.final_stats else None,
            "peak_memory_gb": round(self.peak_memory_gb, 3),
        }


def answer_text(steps: Iterable[Step], on_text=None, on_thinking=None) -> tuple[str, Stats | None]:
    """The answer without its thinking: thinking steps are counted, not kept; leading blank space is dropped."""
    parts, stats, n_thinking = [], None, 0
    for step in steps:
        stats = step.stats
        if step.thinking:
            n_thinking += 1
            if on_thinking:
                on_thinking(n_thinking)
            continue
        text = step.text if parts else step.text.lstrip()
        if text:
            parts.append(text)
            if on_text:
                on_text(text)
    return "".join(parts), stats


@contextmanager
def rope_for(model, plan: Plan):
    """YaRN with the plan's factor (or none) for the duration of one generation; the model's own setting after."""
    saved = model.config.rope_scaling
    model.set_rope_scaling(yarn_scaling(plan.yarn_factor, plan.native_context))
    try:
        yield
    finally:
        model.set_rope_scaling(saved)


def needs_dual_chunk(config: ModelConfig, tokenizer, text: str, options: SummaryOptions) -> bool:
    """Whether a 2507 model should be loaded with dual chunk attention for this text (Qwen's way past its
    262,144-token window): the text and the room for the answer and the thinking exceed the window.

    The attention is chosen at load, so this is asked before loading. A text with fewer bytes than the
    room is decided without tokenising it (a token is at least a byte).
    """
    native = native_context(config)
    if config.dual_chunk_attention_config or native < QWEN_DUAL_CHUNK["original_max_position_embeddings"]:
        return False
    room = native - options.max_tokens * (2 if tokenizer.thinks(options.think) else 1)
    text = text.strip()
    return len(text.encode()) > room and TokenCounts(tokenizer, text).total > room


class Summarizer:
    """One summarisation run over a model: plans, splits, generates, and keeps the figures."""

    def __init__(self, model, tokenizer, options: SummaryOptions, limits: Limits,
                 progress: SummaryProgress | None = None):
        options.check()
        self.model, self.tokenizer, self.options, self.limits = model, tokenizer, options, limits
        self.progress = progress or SummaryProgress()
        self.thinking = tokenizer.thinks(options.think)  # a 2507 model thinks, or not, whatever is asked
        self.sampling = default_sampling(self.thinking, tokenizer.generation_config, seed=options.seed)
        self.budget_text_tokens = len(tokenizer.encode(THINKING_BUDGET_TEXT))
        self.parts: list[PartSummary] = []
        self.plans: list[Plan] = []
        self.seconds = {"tokenize": 0.0, "prefill": 0.0, "decode": 0.0}
        self.generated_tokens, self.peak_memory_gb, self.final_stats = 0, 0.0, None
        self.document_tokens = 0
        self.language = ""  # the instruction naming the summary's language, set from the document

    def reserved(self, answer_tokens: int) -> int:
        """Tokens one generation may produce: the answer, plus as many for thinking and the budget's closing text."""
        return answer_tokens + (answer_tokens + self.budget_text_tokens if self.thinking else 0)

    def prompt(self, instructions: str, text: str) -> list[int]:
        messages = [{"role": "user", "content": f"{text}\n\n{instructions}"}]
        return self.tokenizer.apply_chat_template(messages, enable_thinking=self.options.think, tokenize=True)

    def final_instructions(self, from_parts: bool) -> str:
        task = ("The text above is a sequence of summaries of consecutive parts of one document, in order. "
                "Summarize the whole document from them." if from_parts else "Summarize the document above.")
        return f"{task} {STYLES[self.options.style]} {self.language}"

    def part_instructions(self, index: int, total: int, from_parts: bool) -> str:
        what = "a sequence of part summaries of one document" if from_parts else "one document"
        return (f"The text above is part {index} of {total} of {what}. Summarize this part concisely, keeping its "
                f"key facts, names and numbers. {self.language}")

    def summarize(self, document: Document) -> Summary:
        start = time.perf_counter()
        text = document.text.strip()
        self.language = self.options.language_instruction(text)
        summary_text = self.summarize_text(text, level=0)
        self.seconds["total"] = time.perf_counter() - start
        return Summary(
            text=summary_text, strategy=self.plans[0].strategy, yarn_factor=self.plans[-1].yarn_factor,
            document_tokens=self.document_tokens, plans=self.plans, parts=self.parts,
            generated_tokens=self.generated_tokens, seconds=self.seconds, final_stats=self.final_stats,
            peak_memory_gb=self.peak_memory_gb,
        )

    def summarize_text(self, text: str, level: int) -> str:
        """Summarise the document (level 0) or the part summaries of the level before: at once, or in parts."""
        start = time.perf_counter()
        counts = TokenCounts(self.tokenizer, text, self.progress.tokenizing)
        if level == 0:
            self.document_tokens = counts.total
        instructions = self.final_instructions(from_parts=level > 0)
        prompt_tokens = counts.total + len(self.prompt(instructions, ""))
        if level and prompt_tokens >= self.plans[-1].prompt_tokens:
            raise QwenMLXError(
                f"the part summaries ({prompt_tokens:,} tokens) are no shorter than the text they summarise "
                f"({self.plans[-1].prompt_tokens:,}); try a smaller --max-tokens"
            )
        answer_tokens = self.reserved(self.options.max_tokens)
        if choose_strategy(prompt_tokens - PROMPT_COUNT_SLACK, answer_tokens, self.limits).strategy != MAP_REDUCE:
            prompt = self.prompt(instructions, text)  # short enough to tokenise once more
            prompt_tokens = len(prompt)
        plan = choose_strategy(prompt_tokens, answer_tokens, self.limits)
        self.seconds["tokenize"] += time.perf_counter() - start
        self.plans.append(plan)
        self.progress.planned(plan, level)
        if plan.strategy != MAP_REDUCE:
            return self.generate(prompt, plan, self.options.max_tokens, final=True)

        summaries = self.map_parts(counts, level)
        joined = "\n\n".join(f"Part {i} of {len(summaries)}:\n{s}" for i, s in enumerate(summaries, 1))
        return self.summarize_text(joined, level + 1)

    def map_parts(self, counts: TokenCounts, level: int) -> list[str]:
        """Split the text to fit one generation per part (native window, memory) and summarise the parts in order."""
        answer_tokens = min(self.options.max_tokens, self.limits.native_context // PART_SUMMARY_SHARE)
        part_context = min(self.limits.native_context, self.limits.longest_context())
        # The prompt around a part, with part numbers as wide as they will plausibly get.
        overhead = len(self.prompt(self.part_instructions(999, 999, level > 0), ""))
        budget = int((part_context - overhead - self.reserved(answer_tokens)) * SPLIT_MARGIN)
        if budget < 2 * answer_tokens:
            raise QwenMLXError(
                f"a part of the document plus its summary cannot fit one generation ({part_context:,} tokens "
                f"within the native window and memory); try a smaller --max-tokens"
            )
        pieces = split_text(counts, budget, self.progress.splitting)
        summaries, start = [], 0
        for index, piece in enumerate(pieces, 1):
            self.progress.map_step(level, index, len(pieces), piece)
            instructions = self.part_instructions(index, len(pieces), level > 0)
            prompt = self.prompt(instructions, piece.strip())
            plan = choose_strategy(len(prompt), self.reserved(answer_tokens), self.limits)
            assert plan.strategy != MAP_REDUCE and not plan.yarn_factor, f"part {index} should fit one native pass: {plan}"
            summaries.append(self.generate(prompt, plan, answer_tokens, final=False))
            self.parts.append(PartSummary(level, index, start, start + len(piece), len(prompt), summaries[-1]))
            start += len(piece)
        self.progress.mapped(level, len(pieces))
        return summaries

    def generate(self, prompt: list[int], plan: Plan, answer_tokens: int, final: bool) -> str:
        """One generation under the plan's YaRN factor and KV cache; only the final one streams its answer."""
        with rope_for(self.model, plan):
            steps = stream_generate(
                self.model, self.tokenizer, prompt, cache=make_cache(self.model, kv_bits=plan.kv_bits),
                sampling=self.sampling, max_tokens=plan.answer_tokens,
                thinking_budget=answer_tokens if self.thinking else None,
                on_prefill_progress=self.progress.prefill,
            )
            text, stats = answer_text(steps, self.progress.answer if final else None, self.progress.thinking)
        self.seconds["prefill"] += stats.prefill_seconds
        self.seconds["decode"] += stats.decode_seconds
        self.generated_tokens += stats.generated_tokens
        self.peak_memory_gb = max(self.peak_memory_gb, stats.peak_memory_gb)
        if final:
            self.final_stats = stats
        return text.strip()


def summarize(model, tokenizer, document: Document, options: SummaryOptions | None = None, *,
              progress: SummaryProgress | None = None, limits: Limits | None = None) -> Summary:
    """Summarise a document with a loaded model; limits default to the model's config and this machine's memory."""
    limits = limits or limits_for(model)
    return Summarizer(model, tokenizer, options or SummaryOptions(), limits, progress).summarize(document)
