"""Chat templates: compiled and rendered as transformers does, in a jinja2 sandbox, within limits.

A chat template comes with the model, from wherever the model came from: it is code nobody here wrote.
The sandbox keeps it away from Python's internals (as in transformers); the limits below keep it from
running or growing without end. Every loop step, call, filter, operator and piece of output is counted
against one render's budget, and whatever goes wrong is one line: `chat template: ...`.
"""

import functools
import json
import re
import time
from contextlib import contextmanager
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import QwenMLXError

MAX_LOOP_STEPS = 1_000_000  # iterations of all loops in one render; a chat template makes one per message or so
MAX_SIZE = 1 << 25  # characters (or items) of any value a render builds, and of all it outputs
MAX_INT_BITS = 256  # integers a render builds
MAX_SECONDS = 10.0  # a render takes milliseconds; this stops what the counts cannot see (slow comparisons)
AMPLIFIERS = ("replace", "join")  # methods and filters whose result grows with the product of two inputs
FORMATTERS = ("format", "format_map")


class RenderLimit(jinja2.TemplateError):
    """A render went past one of the limits."""


def size(value, seen: dict) -> int:
    """Characters of a string, items of a container with all they hold; 1 for anything else.

    seen caches containers by id for one render (and keeps them alive, so that no id is reused).
    """
    if isinstance(value, str | bytes):
        return len(value)
    if not isinstance(value, list | tuple | dict | set | frozenset):
        return 1
    if id(value) not in seen:
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        seen[id(value)] = (value, len(value) + sum(size(item, seen) for item in items))
    return seen[id(value)][1]


def integers(value):
    """Every integer in a value, containers searched."""
    if isinstance(value, int) and not isinstance(value, bool):
        yield value
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from integers(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from integers(item)


def widest_field(template: str, args) -> int:
    """A bound on one field's width in a format string: the largest number written in it or given to it."""
    written = [int(n) if len(n) < 12 else MAX_SIZE + 1 for n in re.findall(r"\d+", template)]
    return max([1, *written, *(abs(n) for n in integers(args))])


def too_large() -> RenderLimit:
    return RenderLimit(f"stopped: it would build a value of over {MAX_SIZE:,} characters or items")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus a budget for one render: loop steps, sizes, output and time."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.start_render()  # jinja runs some filters while compiling: they count as a render

    def start_render(self) -> None:
        self.steps = self.output = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        self.sizes: dict = {}

    def tick(self, steps: int = 0) -> None:
        self.steps += steps
        if self.steps > MAX_LOOP_STEPS:
            raise RenderLimit(f"stopped after {MAX_LOOP_STEPS:,} loop steps (a loop that never ends?)")
        if time.monotonic() >= self.deadline:
            raise RenderLimit(f"stopped after {MAX_SECONDS:g} s of rendering")

    def estimate(self, inputs, name: str = "", template: str | None = None) -> int:
        """A bound on what an operation (a call, filter or operator called name) builds from its inputs.

        Integers count by value (repeat counts, widths); the rest by size. Refused over MAX_SIZE, before it is built.
        """
        sizes = sorted(size(x, self.sizes) for x in inputs if not isinstance(x, int) or isinstance(x, bool))
        total = max(1, sum(sizes))
        for count in inputs:
            if isinstance(count, int) and not isinstance(count, bool):
                total *= max(1, abs(count))
        if name in AMPLIFIERS and len(sizes) > 1:
            total *= 1 + sizes[-2]
        if template is not None:
            total *= widest_field(template, inputs)
        if total > MAX_SIZE:
            raise too_large()
        return total

    def built(self, value):
        """A value the template built, checked."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_INT_BITS:
                raise RenderLimit(f"stopped: it would build an integer of over {MAX_INT_BITS} bits")
        elif size(value, self.sizes) > MAX_SIZE:
            raise too_large()
        return value

    # The sandbox's hooks: operators and calls (filters are wrapped below), each checked before and after.

    def call_binop(self, context, operator, left, right):
        self.tick()
        if operator in ("*", "**") and all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right)):
            if operator == "**":
                bits = abs(left).bit_length() * right
            else:
                bits = abs(left).bit_length() + abs(right).bit_length()
            if bits > MAX_INT_BITS:
                raise RenderLimit(f"stopped: it would build an integer of over {MAX_INT_BITS} bits")
        elif operator == "*":
            self.estimate([left, right])
        elif operator == "%" and isinstance(left, str):
            self.estimate([left, right], template=left)
        return self.built(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own signature)
        __self.tick()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (__self.loop_items(args[0]), *args[1:])
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        bound, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        template = bound if isinstance(bound, str) and name in FORMATTERS else None
        __self.estimate([bound, *args, *kwargs.values()], name, template)
        return __self.built(super().call(__context, __obj, *args, **kwargs))

    def guarded_filter(self, name: str, function):
        """A filter checked like a call."""

        @functools.wraps(function)
        def guarded(*args, **kwargs):
            self.tick()
            template = args[0] if name == "format" and args and isinstance(args[0], str) else None
            self.estimate([*args, *kwargs.values()], name, template)
            return self.built(function(*args, **kwargs))

        return guarded

    # What the compiled template calls around every loop, `~` and piece of output (see Guard).

    def loop_items(self, iterable):
        for item in iterable:
            self.tick(1)
            yield item

    def emit(self, piece):
        self.tick()
        self.output += len(str(piece))
        if self.output > MAX_SIZE:
            raise RenderLimit(f"stopped: its output passed {MAX_SIZE:,} characters")
        return piece


class Guard(NodeTransformer):
    """Rewrites a parsed template so that loops, `~` and output pass through the sandbox's counters."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "qwenmlx_loop", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        return nodes.Filter(self.generic_visit(node), "qwenmlx_built", [], [], None, None, lineno=node.lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [nodes.Filter(child, "qwenmlx_emit", [], [], None, None, lineno=child.lineno)
                      for child in node.nodes]
        return node


def _counter(method):
    """A filter that hands its value to a sandbox method; taking the context keeps jinja from running it early."""
    return jinja2.pass_context(lambda context, value: method(value))


class ChatTemplate:
    """A model's chat template, compiled once; render() fills it in within the limits above."""

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise QwenMLXError(f"chat template: expected text, got {type(source).__name__}")
        if not source.strip():
            raise QwenMLXError("chat template: empty (the model's chat template has no text)")
        env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters = {name: env.guarded_filter(name, f) for name, f in env.filters.items()}
        env.filters["tojson"] = env.guarded_filter("tojson", tojson)
        env.filters["qwenmlx_loop"] = _counter(env.loop_items)
        env.filters["qwenmlx_built"] = _counter(env.built)
        env.filters["qwenmlx_emit"] = _counter(env.emit)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        del env.globals["lipsum"]  # random paragraphs, as many as asked for: of no use to a chat template
        self.environment = env
        with template_errors():
            tree = env.parse(source)
            for kind in (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport):
                if tree.find(kind) is not None:
                    raise RenderLimit(f"{{% {kind.__name__.lower()} %}} is not allowed: a chat template must be "
                                      "self-contained")
            self.template = env.from_string(Guard().visit(tree))

    def render(self, **variables) -> str:
        self.environment.start_render()
        try:
            with template_errors():
                return self.template.render(**variables)
        finally:
            self.environment.sizes = {}  # let go of what the render looked at


@contextmanager
def template_errors():
    """Whatever a template raises (its own errors, Python's, the limits') as one QwenMLXError line."""
    try:
        yield
    except jinja2.TemplateSyntaxError as e:
        raise QwenMLXError(one_line(f"chat template: line {e.lineno}: {e.message}")) from None
    except jinja2.TemplateError as e:
        raise QwenMLXError(one_line(f"chat template: {e}")) from None
    except RecursionError:
        raise QwenMLXError("chat template: recursion too deep (a macro that calls itself without end?)") from None
    except Exception as e:  # anything else the template's code raised: 1/0, a bad argument, no memory
        raise QwenMLXError(one_line(f"chat template: {type(e).__name__}: {e}")) from None


def one_line(message: str) -> str:
    return " ".join(message.split())


# The helpers transformers gives chat templates.

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)
