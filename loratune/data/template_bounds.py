"""Bounds on a chat template's render: time, size and nesting, so a hostile template is refused, never run.

A chat template ships with a downloaded model (or a server's model directory), so it is
untrusted code. jinja2's sandbox keeps it away from Python internals, but not from a loop that
never ends (``{% for i in range(10**5) %}{% for j in range(10**5) %}``), a value of 100 GB
(``'x' * 10**11``), a macro that calls itself, or ``{% include %}``. One such template would stall
``loratune serve`` for every client. So every render here runs against a :class:`RenderBudget`:

- **time**: :data:`RENDER_SECONDS` per render, checked at every loop step (each ``{% for %}``
  iterable is wrapped when the template is compiled), call, attribute or item lookup, operator,
  filter and written value;
- **size**: no value, buffer or output longer than :data:`MAX_OUTPUT_CHARS` characters (or items),
  checked *before* the operations that can blow up in one step (``*``, ``+``, ``**``, ``%``,
  ``str.format``, ``replace``/``center``/``join``..., the filters ``center``/``indent``/``batch``...),
  and :data:`MAX_WRITTEN_CHARS` written by ``{{ }}`` in all (macro bodies and ``{% set %}`` blocks
  included);
- **nesting**: :data:`MAX_CALL_DEPTH` nested calls (a macro calling itself);
- **loading**: ``{% include %}``, ``{% import %}`` and ``{% extends %}`` are refused when the
  template is compiled (a chat template is rendered alone).

Each bound, when crossed, raises :class:`TemplateBound` (a DataError) whose one line names it.
This module holds the bounds and the checks of values, operators, methods and filters; the
sandbox that applies them while a template runs is :mod:`~loratune.data.template_sandbox`.
"""

from __future__ import annotations

import functools
import re
import string
import types
from collections.abc import Iterator
from contextvars import ContextVar
from time import monotonic
from typing import Any

from ..errors import DataError

RENDER_SECONDS = 2.0
"""Longest one render may run; a chat template renders in well under a millisecond."""
MAX_OUTPUT_CHARS = 8 * 2**20
"""Most characters (or items) in a rendered text, and in any value a template builds."""
MAX_WRITTEN_CHARS = 4 * MAX_OUTPUT_CHARS
"""Most characters all ``{{ }}`` of one render may write, counting macro bodies and set blocks."""
MAX_RANGE = 100_000
"""Longest ``range()`` (jinja2's own sandbox bound)."""
MAX_CALL_DEPTH = 64
"""Deepest nesting of calls (macros, ``loop()``, methods)."""
MAX_INT_BITS = 2**16
"""Largest integer ``*`` and ``**`` may build (bits)."""
MAX_FORMAT_WIDTH = 10_000
"""Largest width or precision in a ``%`` or ``str.format`` format spec."""
MAX_TEMPLATE_CHARS = 2**20
"""Longest template text compiled (real ones are a few KiB)."""

FIX = "fix the template or name another (data.chat_template, --chat-template)"


class TemplateBound(DataError):
    """A chat template crossed one of the render bounds; the message names it."""


class RenderBudget:
    """What one render may still spend: its deadline, characters written, call depth."""

    __slots__ = ("deadline", "written", "depth")

    def __init__(self, seconds: float = RENDER_SECONDS) -> None:
        self.deadline, self.written, self.depth = monotonic() + seconds, 0, 0


BUDGET: ContextVar[RenderBudget | None] = ContextVar("chat_template_budget", default=None)
"""The budget of the render running in this thread or task (None outside a render: no time bound)."""
_get_budget = BUDGET.get


def refuse(detail: str) -> TemplateBound:
    return TemplateBound(f"the chat template {detail}: {FIX}")


def tick() -> RenderBudget | None:
    """Refuse if this render is past its deadline."""
    budget = _get_budget()
    if budget is not None and monotonic() > budget.deadline:
        raise refuse(f"ran for more than {RENDER_SECONDS:g} s, the bound on one render (a loop without end?)")
    return budget


def size_of(value: Any) -> int:
    """Characters of a string; items of a container plus the characters of the strings in it."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return 0
    if len(value) > MAX_OUTPUT_CHARS:
        return len(value)
    items = value.values() if isinstance(value, dict) else value
    return len(value) + sum(len(v) for v in items if isinstance(v, (str, bytes)))


def bounded(size: int, what: str) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise refuse(f"would build a value of {size:,} characters or items {what} (the bound is {MAX_OUTPUT_CHARS:,})")


def bounded_value(value: Any, what: str) -> Any:
    bounded(size_of(value), what)
    return value


# -- operators and methods whose result can be huge in one step: estimated before they run --

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_width(number: int, what: str) -> None:
    if number > MAX_FORMAT_WIDTH:
        raise refuse(f"asked for a width or precision of {number:,} in {what} (the bound is {MAX_FORMAT_WIDTH:,})")


def _ints(args: Any) -> list[int]:
    values = args.values() if isinstance(args, dict) else args if isinstance(args, (tuple, list)) else (args,)
    return [v for v in values if isinstance(v, int)]


def check_percent(fmt: Any, args: Any) -> None:
    """Widths and precisions of ``fmt % args`` (``'%0999999999d'`` would build a GB string)."""
    if not isinstance(fmt, str):
        return
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for part in (width, precision):
            if part == "*":
                for number in _ints(args):
                    _check_width(abs(number), "a '%' format")
            elif part:
                _check_width(int(part), "a '%' format")


def check_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """Widths and precisions of ``fmt.format(...)``, nested ``{:{w}}`` ones included."""
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if not spec:
            continue
        for digits in re.findall(r"\d+", spec):
            _check_width(int(digits), "a str.format spec")
        if "{" in spec:
            for number in _ints(args) + _ints(kwargs):
                _check_width(abs(number), "a str.format spec")


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``'x' * 10**11``, ``2 ** 10**9``, ``big + big`` and ``'%099999999d' % 1`` before they run."""
    sized = (str, bytes, list, tuple)
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise refuse(f"multiplied integers past {MAX_INT_BITS:,} bits")
        elif isinstance(left, int) and isinstance(right, sized):
            bounded(max(left, 0) * size_of(right), "with '*'")
        elif isinstance(right, int) and isinstance(left, sized):
            bounded(max(right, 0) * size_of(left), "with '*'")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 and \
                right * left.bit_length() > MAX_INT_BITS:
            raise refuse(f"raised an integer past {MAX_INT_BITS:,} bits with '**'")
    elif operator == "+":
        if isinstance(left, sized) and isinstance(right, sized):
            bounded(size_of(left) + size_of(right), "with '+'")
    elif operator == "%":
        check_percent(left, right)


def _replaced_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(s, (str, bytes)) or type(old) is not type(s) or type(new) is not type(s):
        return 0
    found = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(s) + found * max(0, len(new) - len(old))


def _width(s: Any, width: Any = 0, *_: Any) -> int:
    return max(len(s), width) if isinstance(width, int) else 0


def _expanded(s: Any, tabsize: Any = 8) -> int:
    tab = "\t" if isinstance(s, str) else b"\t"
    return len(s) + s.count(tab) * tabsize if isinstance(tabsize, int) else 0


def _joined(s: Any, items: Any) -> int:
    items = list(items) if isinstance(items, (list, tuple)) else []
    return sum(len(x) for x in items if isinstance(x, (str, bytes))) + max(len(items) - 1, 0) * len(s)


def _translated(s: Any, table: Any) -> int:
    longest = max((len(v) for v in table.values() if isinstance(v, (str, bytes))), default=1) \
        if isinstance(table, dict) else 1
    return len(s) * max(longest, 1)


STR_METHOD_SIZE = {"replace": _replaced_size, "center": _width, "ljust": _width, "rjust": _width,
                   "zfill": _width, "expandtabs": _expanded, "join": _joined, "translate": _translated}
"""str/bytes methods whose result can outgrow their input, with the size of that result."""


def check_method(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Refuse a str/bytes method call whose result would pass the bound; the args to call it with
    (``join`` of an iterator gets a list, so that its size is known first)."""
    if not isinstance(obj, types.BuiltinMethodType) or not isinstance(getattr(obj, "__self__", None), (str, bytes)):
        return args
    estimate = STR_METHOD_SIZE.get(obj.__name__)
    if estimate is None:
        return args
    if obj.__name__ == "join" and len(args) == 1 and isinstance(args[0], Iterator):
        args = (materialize(args[0], "str.join"),)
    try:
        size = estimate(obj.__self__, *args, **kwargs)
    except TypeError:  # wrong arguments: the call itself says so
        return args
    bounded(size, f"with str.{obj.__name__}")
    return args


def materialize(items: Iterator, what: str) -> list:
    """The items of a lazy sequence (``map``, ``select``...) as a list, refused once they pass the bound."""
    out, size = [], 0
    for item in items:
        tick()
        size += 1 + size_of(item)
        bounded(size, f"with {what}")
        out.append(item)
    return out


# -- filters: their integer arguments bounded, the growing ones estimated, every result checked --

def _filter_sizes() -> dict[str, Any]:
    def center(value, width=80, *_):
        return _width(str(value), width)

    def indent(s, width=4, *_, **__):
        w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(s) + (s.count("\n") + 1) * w if isinstance(s, str) else 0

    def wordwrap(s, width=79, break_long_words=True, wrapstring=None, *_, **__):
        if not isinstance(s, str) or not isinstance(width, int):
            return 0
        lines = s.count(" ") + s.count("\n") + len(s) // max(width, 1) + 1
        return len(s) + lines * len(wrapstring if isinstance(wrapstring, str) else "\n")

    def batch(value, linecount, *_, **__):
        return size_of(value) + (linecount if isinstance(linecount, int) else 0)

    def format_(value, *args, **kwargs):
        check_percent(value, args or kwargs)
        return 0

    return {"center": center, "indent": indent, "wordwrap": wordwrap, "batch": batch, "slice": batch,
            "replace": _replaced_size, "format": format_}


_PLAIN = frozenset({str, list, tuple, dict, int, float, bool, type(None)})


def bounded_filter(name: str, f: Any) -> Any:
    """``f`` checking the deadline, its integer arguments, its estimated and its real result size."""
    from jinja2.utils import _PassArg

    offset = 0 if _PassArg.from_obj(f) is None else 1
    estimate = _filter_sizes().get(name)

    @functools.wraps(f)
    def bounded_f(*args: Any, **kwargs: Any) -> Any:
        tick()
        if len(args) > offset and type(args[offset]) not in _PLAIN and isinstance(args[offset], Iterator):
            args = (*args[:offset], materialize(args[offset], f"the filter {name!r}"), *args[offset + 1:])
        if len(args) > offset + 1 or kwargs:
            for value in (*args[offset + 1:], *kwargs.values()):
                if isinstance(value, int) and abs(value) > MAX_OUTPUT_CHARS:
                    raise refuse(f"passed {value:,} to the filter {name!r} (the bound is {MAX_OUTPUT_CHARS:,})")
        if estimate is not None and len(args) > offset:
            try:
                size = estimate(*args[offset:], **kwargs)
            except TypeError:  # arguments that do not fit: the filter itself says so
                size = 0
            bounded(size, f"with the filter {name!r}")
        return bounded_value(f(*args, **kwargs), f"with the filter {name!r}")

    return bounded_f
