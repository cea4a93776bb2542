"""What a request's JSON body may say, checked before anything is admitted to the engine.

Every field is checked for its type (a boolean is not a number, 2.5 is not an integer), finiteness and range
here, and a bad one is a 400 naming it: a value that slipped through would fail inside the engine's step,
where it is shared with other clients' rows. OpenAI fields loratune does not honour are refused by name rather
than ignored (a client asking for ``echo`` or ``tools`` would otherwise take a plain answer for what it asked).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..generate.sampling import LogitsProcessing, SamplingConfig

from ..data.chat_template import RESERVED_TEMPLATE_VARIABLES as RESERVED  # one list for the CLI and the server

CHARS_PER_TOKEN = 64
"""A prompt of more characters than this many per --max-prompt-tokens is refused before tokenizing (a token of
a real tokenizer covers far fewer; tokenizing 20 MB would take seconds)."""

ROLES = ("system", "user", "assistant")
"""The roles a chat message may have: those training data takes (loratune/data/chat_formats.py)."""
MAX_LOGPROBS = 20
"""The most alternatives ``logprobs``/``top_logprobs`` may ask for (vLLM's default limit; OpenAI's is 20)."""
MAX_N = 8
_TOKEN_ID = re.compile(r"[0-9]{1,9}")

UNSUPPORTED = {
    "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "function_call": (None, "none"),
    "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "repetition_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0), "ignore_eos": (None, False), "use_beam_search": (None, False),
    "stop_token_ids": (None, []), "prompt_logprobs": (None,), "length_penalty": (None, 1, 1.0),
}
"""OpenAI (and vLLM) fields this server does not honour, with the values that ask for nothing (accepted)."""


def default_body_limit(max_prompt_tokens: int) -> int:
    """1 MiB for the fields, plus the longest prompt allowed at 12 bytes a character (JSON's worst case: a
    ``\\uXXXX\\uXXXX`` surrogate pair per character)."""
    return 2**20 + 12 * CHARS_PER_TOKEN * max_prompt_tokens


async def read_body(request, limit: int, off_loop) -> dict:
    """A request's body as a JSON object: refused (413) past ``limit`` bytes without reading the rest, parsed
    by ``off_loop`` (a coroutine function running its argument off the event loop) when it is large, and
    checked for text that is not Unicode (a lone surrogate)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body has {int(declared):,} bytes; this server takes at most {limit:,} "
                         "(--max-body-bytes)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body is over {limit:,} bytes, the most this server takes "
                             "(--max-body-bytes)", 413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw) if size < 2**20 else await off_loop(json.loads, raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    check_text(body)
    return body


class BadRequest(Exception):
    """A request the server refuses (HTTP 400, or ``status``), with the one line that says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass
class Params:
    """A completion's settings, checked: what the engine and the answer's formatting need."""

    sampling: SamplingConfig
    n: int
    stops: list[str]
    processing: LogitsProcessing | None
    logprobs: int | None
    """Top alternatives to report per token (0: the chosen token's only); None: no logprobs."""
    stream: bool
    include_usage: bool


def integer(body: dict, key: str, lo: int, hi: int, default: Any = None) -> Any:
    """``body[key]`` as an integer in [lo, hi] (absent or null: ``default``)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer in [{lo}, {hi}], got {_shown(value)}")
    return value


def number(body: dict, key: str, lo: float, hi: float, default: Any = None) -> Any:
    """``body[key]`` as a finite number in [lo, hi] (absent or null: ``default``)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise BadRequest(f"{key} must be a number in [{lo:g}, {hi:g}], got {_shown(value)}")
    return float(value)


def boolean(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false, got {_shown(value)}")
    return value


def check_unsupported(body: dict, chat: bool) -> None:
    """Refuse fields loratune does not honour (see :data:`UNSUPPORTED`), naming them."""
    for key, harmless in UNSUPPORTED.items():
        if key in body and not any(body[key] == h and type(body[key]) is type(h) for h in harmless):
            raise BadRequest(f"{key} is not supported by loratune serve: leave it out")
    if body.get("echo") is not None and body.get("echo") is not False:
        raise BadRequest("echo is not supported by loratune serve (the answer holds the new text only): leave it out")
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    if body.get("best_of") is not None and (isinstance(body["best_of"], bool) or body["best_of"] != n):
        raise BadRequest(f"best_of is not supported by loratune serve (only best_of equal to n, {n}): leave it out")


def model_name(body: dict, default: str) -> str:
    value = body.get("model")
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise BadRequest(f"model must be a string (the base model's name or an adapter's), got {_shown(value)}")
    return value


def params(body: dict, prompt_len: int, chat: bool, max_tokens_limit: int, context: int, vocab: int) -> Params:
    """Every sampling field of ``body``, checked (a :class:`BadRequest` names the first bad one)."""
    check_unsupported(body, chat)
    max_tokens = integer(body, "max_completion_tokens", 1, max_tokens_limit,
                         integer(body, "max_tokens", 1, max_tokens_limit))
    if max_tokens is None:  # OpenAI's defaults: 16 for completions; chat runs until it ends (here: our limits)
        max_tokens = max(1, min(max_tokens_limit, context - prompt_len)) if chat else 16
    n = integer(body, "n", 1, MAX_N, 1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 non-empty strings")
    top_k = integer(body, "top_k", -1, 2**31 - 1)
    seed = integer(body, "seed", 0, 2**64 - 1)
    try:
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=number(body, "temperature", 0, 100, 1.0),
                                  top_k=None if top_k in (None, -1, 0) else top_k,
                                  top_p=_top_p(body), seed=seed)
        processing = LogitsProcessing(_logit_bias(body, vocab), number(body, "presence_penalty", -2, 2, 0.0),
                                      number(body, "frequency_penalty", -2, 2, 0.0))
    except ConfigError as exc:  # checked above already; the dataclasses' own rule is the last word
        raise BadRequest(str(exc)) from None
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest(f"stream_options must be an object such as {{\"include_usage\": true}}, got {_shown(options)}")
    include_usage = boolean(options or {}, "include_usage")
    return Params(sampling, n, stop, processing if processing.active() else None, _logprobs(body, chat), stream,
                  include_usage)


def _top_p(body: dict) -> float | None:
    value = body.get("top_p")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < value <= 1):  # NaN fails the comparison too
        raise BadRequest(f"top_p must be a number in (0, 1], got {_shown(value)}")
    return None if value is None else float(value)


def _logprobs(body: dict, chat: bool) -> int | None:
    if not chat:  # completions: logprobs is the number of alternatives (OpenAI's legacy API)
        return integer(body, "logprobs", 0, MAX_LOGPROBS)
    top = integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if not boolean(body, "logprobs"):
        if top:
            raise BadRequest("top_logprobs needs logprobs: true")
        return None
    return top or 0


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise BadRequest(f"logit_bias must be an object of token id -> bias, got {_shown(bias)}")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and _TOKEN_ID.fullmatch(key)) or int(key) >= vocab:
            raise BadRequest(f"logit_bias keys must be token ids in [0, {vocab}), got {_shown(key)}")
        value = bias[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not -100 <= value <= 100:
            raise BadRequest(f"logit_bias for token {key} must be a number in [-100, 100], got {_shown(value)}")
        out[int(key)] = float(value)
    return out


def chat_variables(body: dict) -> dict[str, Any]:
    variables = body.get("chat_template_kwargs") or {}
    if not isinstance(variables, dict) or not all(
            isinstance(k, str) and k.isidentifier() and k not in RESERVED and isinstance(v, (str, bool, int, float))
            for k, v in variables.items()):
        raise BadRequest("chat_template_kwargs must map names to plain values (and may not set "
                         f"{', '.join(sorted(RESERVED))})")
    return variables


def messages(body: dict) -> list[dict[str, str]]:
    """The conversation as {role, content} with text content, refused as training data refuses it (no role, an
    unknown one, content that is not text)."""
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(given):
        if not isinstance(m, dict):
            raise BadRequest(f"message {i} must be an object with role and content, got {_shown(m)}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            said = "no role" if role is None else f"the unknown role {_shown(role)}"
            raise BadRequest(f"message {i} has {said}; roles are {', '.join(ROLES)}")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"message {i}: only text content parts are supported "
                                 '({"type": "text", "text": ...})')
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"message {i}: a text content part needs \"text\" (a string)")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"message {i}: content must be a string or a list of text parts, got {_shown(content)}")


def check_text(value: Any, where: str = "the request", depth: int = 0) -> None:
    """Refuse strings that are not Unicode text (a lone surrogate such as JSON's "\\ud800" cannot be encoded,
    tokenized or sent back) anywhere in the body."""
    if depth > 64:
        raise BadRequest("the request nests deeper than 64 levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(f"{where} holds a character that is not valid Unicode (a lone surrogate "
                             f"{_shown(value[exc.start])} at character {exc.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where, depth + 1)
            check_text(v, f"{k!s}" if depth == 0 else where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_text(v, where, depth + 1)


def _shown(value: Any) -> str:
    """A value for an error line: short, and safe to send back (no lone surrogates)."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
