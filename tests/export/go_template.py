"""The part of Go's text/template that Ollama's chat templates use, to render our Modelfile templates in tests
(no Go toolchain here). No pytest here.

Covered, with Go's semantics: text and ``{{ }}`` actions with the ``{{-`` / ``-}}`` whitespace trims;
``if`` / ``else if`` / ``else`` / ``end``; ``range $i, $v := pipeline``; ``$x := v`` (declares in the
innermost scope: ``if`` and each ``range`` iteration open one) and ``$x = v`` (assigns the nearest);
fields (``.Role``, ``$.Messages``), variables, string literals with Go escapes, parentheses, and the
functions ``eq ne and or not len slice printf``, integer literals. Anything else raises, so a template using more fails loudly.
"""

from __future__ import annotations

import ast
import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|:=|=|,|\$?[\w.$]*)')


def _truthy(value: Any) -> bool:
    return bool(value)


FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "len": len, "slice": lambda x, *i: x[i[0]:] if len(i) == 1 else x[i[0]:i[1]], "printf": lambda f, *a: f.replace("%s", "{}").format(*a),
}


def _pieces(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], whitespace trimmed as the markers say."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    text = template[pos:]
    out.append(("text", text.lstrip(" \t\r\n") if trim_next else text))
    return out


def _parse(pieces: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str]:
    """Nodes up to an action starting with one of ``stop``; returns (nodes, index after it, that action)."""
    nodes: list = []
    while i < len(pieces):
        kind, body = pieces[i]
        i += 1
        if kind == "text":
            nodes.append(("text", body))
            continue
        word = body.split(" ", 1)[0]
        if word in stop or (body.startswith("else") and "else" in stop):
            return nodes, i, body
        if word == "if":
            branches, cond = [], body[3:]
            while True:
                inner, i, ended = _parse(pieces, i, ("end", "else"))
                branches.append((cond, inner))
                if ended == "end":
                    break
                cond = ended[len("else if "):] if ended.startswith("else if ") else "true_"
            nodes.append(("if", branches))
        elif word == "range":
            head, pipeline = body[6:].split(":=", 1)
            names = [n.strip() for n in head.split(",")]
            inner, i, _ = _parse(pieces, i, ("end",))
            nodes.append(("range", names, pipeline.strip(), inner))
        else:
            nodes.append(("action", body))
    if stop:
        raise ValueError(f"unclosed block: expected {stop}")
    return nodes, i, ""


class _Scope:
    def __init__(self, root: Any) -> None:
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise NameError(f"undefined variable {name}")

    def set(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise NameError(f"assignment to undeclared {name}")


def _field(value: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def _tokens(expr: str) -> list[str]:
    return [t for t in _TOKEN.findall(expr) if t]


def _operand(tokens: list[str], scope: _Scope, dot: Any) -> Any:
    tok = tokens.pop(0)
    if tok == "(":
        value = _command(tokens, scope, dot)
        assert tokens.pop(0) == ")"
        return value
    if tok.startswith('"') or tok.isdigit():
        return ast.literal_eval(tok)
    if tok.startswith("$"):
        name, _, path = tok.partition(".")
        return _field(scope.get(name), path)
    if tok.startswith("."):
        return _field(dot, tok)
    raise ValueError(f"unsupported operand {tok!r}")


def _command(tokens: list[str], scope: _Scope, dot: Any) -> Any:
    if tokens and tokens[0] in FUNCS:
        func = FUNCS[tokens.pop(0)]
        args = []
        while tokens and tokens[0] != ")":
            args.append(_operand(tokens, scope, dot))
        return func(*args)
    return _operand(tokens, scope, dot)


def _eval(expr: str, scope: _Scope, dot: Any) -> Any:
    tokens = _tokens(expr)
    value = _command(tokens, scope, dot)
    if tokens:
        raise ValueError(f"unsupported expression {expr!r}")
    return value


def _run(nodes: list, scope: _Scope, dot: Any, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            body = node[1]
            declared = re.match(r"^(\$\w+)\s*(:=|=)\s*(.*)$", body, re.S)
            if declared:
                name, op, expr = declared.groups()
                value = _eval(expr, scope, dot)
                scope.frames[-1].__setitem__(name, value) if op == ":=" else scope.set(name, value)
            else:
                value = _eval(body, scope, dot)
                out.append("" if value is None else str(value))
        elif node[0] == "if":
            for cond, inner in node[1]:
                if cond == "true_" or _truthy(_eval(cond, scope, dot)):
                    scope.frames.append({})
                    _run(inner, scope, dot, out)
                    scope.frames.pop()
                    break
        elif node[0] == "range":
            names, pipeline, inner = node[1], node[2], node[3]
            for i, item in enumerate(_eval(pipeline, scope, dot)):
                frame = dict(zip(names, (i, item))) if len(names) == 2 else {names[0]: item}
                scope.frames.append(frame)
                _run(inner, scope, item, out)
                scope.frames.pop()


def render(template: str, data: dict[str, Any]) -> str:
    """``template`` executed on ``data`` (e.g. ``{"Messages": [{"Role": "user", "Content": "hi"}]}``)."""
    nodes, _, _ = _parse(_pieces(template), 0, ())
    out: list[str] = []
    _run(nodes, _Scope(data), data, out)
    return "".join(out)
