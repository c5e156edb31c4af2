"""Limits for rendering chat templates that came inside a GGUF file (that is: from a stranger).

jinja2's immutable sandbox already keeps a template away from Python internals (no `__class__`,
`__globals__`, `__subclasses__`, no mutation of the messages): the template injection of
CVE-2024-34359 ("Llama Drama") renders nothing there. What the sandbox does not bound is work:
`{{ 'a' * 10**10 }}` (folded at compile time unless the operator is intercepted), `9**9**9`,
`'x'|center(10**9)`, nested `range(100000)` loops. So a template is compiled and rendered

- in `BoundedSandbox`: `*`, `**`, `+` and `%` are intercepted (no constant folding at compile time)
  and refuse results beyond MAX_TEXT characters or MAX_INT_BITS bits;
- under `render_limits()`: at most MAX_EXTRA_MEMORY more address space (RLIMIT_AS, restored after),
  and at most MAX_LINES Python line events or MAX_SECONDS of wall time (a trace function, this thread
  only, restored after).

Any limit raises TemplateLimitError (or MemoryError); the tokenizer then falls back to the built-in
Gemma 4 layout, as for any template that fails.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEXT = 1 << 22  # characters (or items) of one intermediate string/list made by an operator
MAX_INT_BITS = 1 << 14
MAX_EXTRA_MEMORY = 256 << 20
MAX_LINES = 1_000_000  # a real chat template over a long conversation: tens of thousands
MAX_SECONDS = 2.0
_WIDTH = re.compile(r"%[-#0 +]*(\*|\d{5,})|\.(\*|\d{5,})")  # '%' formats with a huge or '*' width/precision


class TemplateLimitError(SecurityError):
    """A chat template that wanted more time or memory than a prompt needs."""


class _OutOfSteps(BaseException):  # noqa: N818
    """Raised by the trace function. Not an Exception: jinja evaluates constant filter calls at compile
    time and swallows any Exception they raise (nodes.Impossible), and CPython turns tracing off for
    good once a trace function raises; a BaseException goes straight out to render_limits."""


def _size(v: Any) -> int | None:
    return len(v) if isinstance(v, str | bytes | list | tuple) else None


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = all(isinstance(v, int) for v in (left, right))
        if operator == "**" and ints and right > 0 and max(abs(left), 2).bit_length() * right > MAX_INT_BITS:
            raise TemplateLimitError(f"template power {left}**{right} is too large")
        if operator == "*":
            if ints and abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
                raise TemplateLimitError("template product is too large")
            for seq, n in ((left, right), (right, left)):
                size = _size(seq)
                if size is not None and isinstance(n, int) and size * n > MAX_TEXT:
                    raise TemplateLimitError(f"template repeats a {size}-item sequence {n} times")
        if operator == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None and a + b > MAX_TEXT:
                raise TemplateLimitError("template concatenation is too long")
            if ints and max(abs(left), abs(right)).bit_length() > MAX_INT_BITS:
                raise TemplateLimitError("template sum is too large")
        if operator == "%" and isinstance(left, str) and _WIDTH.search(left):
            raise TemplateLimitError("template format string has a huge width or precision")
        return super().call_binop(context, operator, left, right)


@contextmanager
def render_limits(max_lines: int = MAX_LINES, max_seconds: float = MAX_SECONDS,
                  max_extra_memory: int = MAX_EXTRA_MEMORY) -> Iterator[None]:
    with _memory_cap(max_extra_memory), _work_cap(max_lines, max_seconds):
        yield


@contextmanager
def _work_cap(max_lines: int, max_seconds: float) -> Iterator[None]:
    previous = sys.gettrace()
    deadline = time.monotonic() + max_seconds
    count = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
            if count > max_lines or (count & 0xFFF == 0 and time.monotonic() > deadline):
                raise _OutOfSteps
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local

    sys.settrace(tracer)
    try:
        yield
    except _OutOfSteps:
        raise TemplateLimitError(f"template rendering took more than {max_lines} steps or {max_seconds:g} s") \
            from None
    finally:
        sys.settrace(previous)


@contextmanager
def _memory_cap(extra: int) -> Iterator[None]:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as fh:
            vsize = int(fh.read().split()[0]) * resource.getpagesize()
    except (ImportError, OSError, ValueError):  # not Linux: the work cap still applies
        yield
        return
    cap = vsize + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:  # already at least as tight
        yield
        return
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


__all__ = ["BoundedSandbox", "TemplateLimitError", "render_limits"]
