"""The sandbox a chat template runs in: jinja2's ImmutableSandboxedEnvironment with the render bounds applied.

Where the bounds of :mod:`~loratune.data.template_bounds` are checked: every ``{% for %}`` iterable,
every ``{{ }}`` and every ``~`` is wrapped when the template is compiled (so each loop step checks
the deadline, and what is written is counted); the sandbox's own hooks check each call, attribute
and item lookup, the operators ``*``, ``**``, ``+`` and ``%``, and ``str.format``; ``range`` is
bounded; block and macro outputs are joined under the size bound; and ``{% include %}``,
``{% import %}`` and ``{% extends %}`` are refused when the template is compiled.
"""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context
from jinja2.visitor import NodeTransformer

from .template_bounds import (
    FIX,
    MAX_CALL_DEPTH,
    MAX_OUTPUT_CHARS,
    MAX_RANGE,
    MAX_TEMPLATE_CHARS,
    MAX_WRITTEN_CHARS,
    TemplateBound,
    bounded,
    bounded_filter,
    bounded_value,
    check_binop,
    check_format,
    check_method,
    refuse,
    tick,
)

_LOOP, _EMIT, _CONCAT = "loratune.loop", "loratune.emit", "loratune.concat"


class _Guarded:
    """A ``{% for %}`` iterable that checks the deadline at each step (and keeps its length)."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self):
        for item in self.inner:
            tick()
            yield item

    def __len__(self) -> int:
        return len(self.inner)


def _loop(value: Any) -> _Guarded:
    return _Guarded(value)


def _emit(value: Any) -> str:
    text = str(value)
    budget = tick()
    if budget is not None:
        budget.written += len(text)
        if budget.written > MAX_WRITTEN_CHARS:
            raise refuse(f"wrote more than {MAX_WRITTEN_CHARS:,} characters in all (the bound on one render)")
    return text


def _concat(values: list) -> str:
    texts = [str(v) for v in values]
    bounded(sum(map(len, texts)), "with '~'")
    return "".join(texts)


def bounded_concat(parts: Any) -> str:
    """The join of a macro body's or set block's pieces, refused past the bound."""
    parts = list(parts)
    bounded(sum(map(len, parts)), "in a block or macro")
    return "".join(parts)


def guard_tree(tree: Any, environment: Any) -> Any:
    """The parsed template with its loops, writes and '~' checked; include/import/extends refused."""
    for kind, tag in ((nodes.Include, "include"), (nodes.Import, "import"), (nodes.FromImport, "from ... import"),
                      (nodes.Extends, "extends")):
        found = next(iter(tree.find_all(kind)), None)
        if found is not None:
            raise TemplateBound(f"the chat template uses {{% {tag} %}} (line {found.lineno}): loratune renders a chat "
                                f"template alone, without loading others; put everything in one template")

    def wrapped(node: Any, name: str) -> Any:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    class Guard(NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = wrapped(node.iter, _LOOP)
            return node

        def visit_Output(self, node):
            node = self.generic_visit(node)
            node.nodes = [c if isinstance(c, (nodes.TemplateData, nodes.Const)) else wrapped(c, _EMIT)
                          for c in node.nodes]
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return wrapped(nodes.List(node.nodes, lineno=node.lineno), _CONCAT)

    tree = Guard().visit(tree)
    tree.set_environment(environment)
    return tree


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's ImmutableSandboxedEnvironment with every bound of :mod:`~loratune.data.template_bounds` in place."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.concat = bounded_concat
        self.globals["range"] = bounded_range
        # pass_context keeps these out of jinja's compile-time constant folding
        self.filters[_LOOP] = pass_context(lambda _, value: _loop(value))
        self.filters[_EMIT] = pass_context(lambda _, value: _emit(value))
        self.filters[_CONCAT] = pass_context(lambda _, values: _concat(values))

    def bound_filters(self) -> None:
        """Wrap every filter (once the caller has added its own)."""
        for name, f in list(self.filters.items()):
            if not name.startswith("loratune."):
                self.filters[name] = bounded_filter(name, f)

    def _parse(self, source, name, filename):
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateBound(f"the chat template is {len(source):,} characters (the bound is "
                                f"{MAX_TEMPLATE_CHARS:,}): {FIX}")
        return guard_tree(super()._parse(source, name, filename), self)

    def call_binop(self, context, operator, left, right):
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept fast
            if len(left) + len(right) > MAX_OUTPUT_CHARS:
                bounded(len(left) + len(right), "with '+'")
            return left + right
        tick()
        check_binop(operator, left, right)
        return bounded_value(super().call_binop(context, operator, left, right), f"with {operator!r}")

    def getattr(self, obj, attribute):
        tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapper)
        def checked(*args, **kwargs):
            check_format(fmt, args, kwargs)
            return bounded_value(wrapper(*args, **kwargs), "with str.format")

        return checked

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        budget = tick()
        args = check_method(__obj, args, kwargs)
        if budget is None:
            return bounded_value(super().call(__context, __obj, *args, **kwargs), "as a call's result")
        budget.depth += 1
        try:
            if budget.depth > MAX_CALL_DEPTH:
                raise refuse(f"nested calls more than {MAX_CALL_DEPTH} deep (a macro that calls itself "
                             "without end?)")
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return bounded_value(result, "as a call's result")


def bounded_range(*args: Any) -> range:
    """``range`` of at most :data:`MAX_RANGE` items (iterating it in a loop checks the deadline)."""
    tick()
    rng = range(*args)
    try:
        n = f"{len(rng):,}"
        fits = len(rng) <= MAX_RANGE
    except OverflowError:  # more items than sys.maxsize
        n, fits = "more than 2**63", False
    if not fits:
        raise refuse(f"asked for a range of {n} items (the bound is {MAX_RANGE:,})")
    return rng
