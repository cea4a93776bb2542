"""Chat templates: a model's ``chat_template`` rendered as transformers' ``apply_chat_template`` renders it.

A template ships with a downloaded model, so it is untrusted code: it runs in jinja2's
``ImmutableSandboxedEnvironment`` with the globals and filters transformers gives it
(``raise_exception``, ``strftime_now``, a JSON ``tojson`` that does not escape HTML, ``dict``,
a ``namespace`` that refuses underscore attributes, loop controls, trim/lstrip blocks) and the
``{% generation %}`` tag, whose spans (the assistant's text, where a template marks it) are
recorded for loss masking. A template that reaches for Python internals raises jinja2's
SecurityError, reported as a DataError; one that runs too long, builds too much, nests calls too
deep or loads other templates is refused by the bounds in :mod:`~loratune.data.template_bounds`,
so a hostile template costs a server at most :data:`RENDER_SECONDS` of one worker thread.
"""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, DataError
from .jsonfiles import json_or_empty, token_text
from .template_bounds import BUDGET, MAX_OUTPUT_CHARS, RENDER_SECONDS, RenderBudget, refuse

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SPANS: ContextVar[list | None] = ContextVar("generation_spans", default=None)
_OUTPUT: ContextVar[list | None] = ContextVar("rendered_so_far", default=None)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}
"""Templates a recipe can name in ``data.chat_template`` (ChatML needs <|im_start|> and <|im_end|> tokens)."""
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "template", "tokenizer"})
"""Names a template variable may not take (recipe, --template-var, chat_template_kwargs): loratune sets
the first two itself, and the others name the template and tokenizer the render uses."""
MAX_TOJSON_INDENT = 64
"""Largest ``indent`` of the ``tojson`` filter (a huge one would write that many spaces per line)."""


def check_template_variables(variables: Any, where: str) -> None:
    """Refuse template variables that are not a mapping of names, or that take a reserved name.

    Why: ``messages`` or ``add_generation_prompt`` among them would collide with what the render
    passes itself (a TypeError deep inside); ``where`` names the setting in the message
    ('data.template_kwargs', '--template-var').
    """
    if not isinstance(variables, dict):
        raise ConfigError(f"{where} must map variable names to values, got {variables!r}")
    for name in variables:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where}: {name!r} is not a variable name (letters, digits and _, not first a digit)")
        if name in RESERVED_TEMPLATE_VARIABLES:
            raise ConfigError(f"{where}: {name!r} is set by loratune itself and cannot be a template variable "
                              f"(reserved: {', '.join(sorted(RESERVED_TEMPLATE_VARIABLES))})")


def read_chat_template(model_dir: str | Path) -> str | None:
    """The model's template: ``chat_template.jinja``, else tokenizer_config.json's ``chat_template``
    (a string, or the one named 'default' in a list of named templates); None if it has none."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    path = model_dir / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def special_tokens(model_dir: str | Path) -> dict[str, str]:
    """bos_token, eos_token ... as text, from tokenizer_config.json (what templates read)."""
    config = json_or_empty(Path(model_dir) / "tokenizer_config.json")
    texts = {key: token_text(config.get(key)) for key in _SPECIAL}
    return {key: text for key, text in texts.items() if text is not None}


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols

    from .template_sandbox import BoundedSandbox

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}``: record where the assistant's text lands."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            spans, output = _SPANS.get(), _OUTPUT.get()
            if spans is not None:  # everything before this block has been yielded already
                start = sum(map(len, output))
                spans.append((start, start + len(text)))
            return text

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # the same signature trick as jinja2's Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, (int, str)) and not isinstance(indent, bool) and \
                (indent if isinstance(indent, int) else len(indent)) > MAX_TOJSON_INDENT:
            raise refuse(f"asked tojson for an indent of {indent if isinstance(indent, int) else len(indent):,} "
                         f"(the bound is {MAX_TOJSON_INDENT})")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.bound_filters()
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=dict, namespace=Namespace)
    return env


def resolve_chat_template(choice: str | None, own: str | None, model: str) -> str:
    """The template text: ``choice`` (a .jinja file or a name in NAMED_TEMPLATES), else the model's ``own``."""
    if choice is None:
        if own is None:
            raise DataError(f"{model} has no chat template (a base model?): name one with data.chat_template in the "
                            f"recipe (--chat-template for generate): a .jinja file or a named template "
                            f"({', '.join(NAMED_TEMPLATES)}); or use an instruct model")
        return own
    if choice in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[choice]
    path = Path(choice).expanduser()
    if not path.is_file():
        raise DataError(f"data.chat_template {choice!r} is neither a file nor a named template "
                        f"({', '.join(NAMED_TEMPLATES)})")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the chat template {path}: {exc}") from None


class ChatTemplate:
    """A chat template compiled once in the bounded sandbox, with the tokenizer's special tokens as variables.

    ``render`` may run in several threads at once (a server renders off its event loop): each
    render keeps its own budget.
    """

    def __init__(self, template: str, special: dict[str, str] | None = None, /, **kwargs: Any) -> None:
        import jinja2

        check_template_variables(kwargs, "a chat template variable")
        try:
            self.compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise DataError(f"the chat template does not parse (line {exc.lineno}): {exc.message}") from None
        except RecursionError:
            raise DataError("the chat template nests too deeply to parse: it is not a template loratune will run"
                            ) from None
        self.variables = {**(special or {}), **kwargs}
        self.has_generation_tag = "generation" in template and "endgeneration" in template

    def render(self, messages: list[dict[str, Any]], /, add_generation_prompt: bool = False,
               **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """(text, generation spans as (start, end) characters) of ``messages``, as transformers renders it.

        A template error, a sandbox refusal or a crossed bound (time, size, nesting) is a DataError
        of one line saying so; no template stalls the caller for more than about RENDER_SECONDS.
        """
        import jinja2

        check_template_variables(kwargs, "a chat template variable")
        spans: list[tuple[int, int]] = []
        output: list[str] = []
        budget = RenderBudget(RENDER_SECONDS)
        tokens = _SPANS.set(spans), _OUTPUT.set(output), BUDGET.set(budget)
        size = 0
        try:
            for block in self.compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **{**self.variables, **kwargs}):
                size += len(block)
                if size > MAX_OUTPUT_CHARS:
                    raise refuse(f"produced more than {MAX_OUTPUT_CHARS:,} characters (the bound on one render)")
                output.append(block)
                if time.monotonic() > budget.deadline:
                    raise refuse(f"ran for more than {RENDER_SECONDS:g} s, the bound on one render (a loop "
                                 "without end?)")
        except DataError as exc:  # a crossed bound (TemplateBound)
            raise type(exc)(str(exc)) from None
        except jinja2.exceptions.SecurityError as exc:
            raise DataError(f"the chat template tried something the sandbox refuses ({_line(exc)}): it is not a "
                            "template loratune will run") from None
        except jinja2.TemplateError as exc:
            raise DataError(f"the chat template raised an error for this conversation: {_line(exc)}") from None
        except RecursionError:
            raise DataError("the chat template nested calls deeper than Python allows (a macro that calls itself "
                            "without end?): it is not a template loratune will run") from None
        except MemoryError:
            raise DataError("the chat template ran out of memory: it is not a template loratune will run") from None
        except Exception as exc:  # the template's own bug (1 / 0, 'a' + 1, int('x')): untrusted code, not ours
            raise DataError(f"the chat template failed for this conversation: {type(exc).__name__}: "
                            f"{_line(exc)}") from None
        finally:
            _SPANS.reset(tokens[0])
            _OUTPUT.reset(tokens[1])
            BUDGET.reset(tokens[2])
        return "".join(output), spans


def _line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
