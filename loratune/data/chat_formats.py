"""Records -> conversations: OpenAI messages, ShareGPT, Alpaca, or a prompt/completion template.

Every format becomes a list of ``{"role": ..., "content": ...}`` messages with roles system,
user and assistant, which is what chat templates take. ``data.fields`` renames fields for
records that use other names (``{messages: dialog, role: speaker, content: text}``). A record
that does not fit is a DataError naming where it is (``line 12`` of a .jsonl file).
"""

from __future__ import annotations

import string
from typing import Any

from ..errors import DataError
from .config import DataConfig, _template_fields
from .sources import record_place

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
"""ShareGPT's 'from' values (as FastChat and axolotl read them) -> roles."""


def chat_format(records: list[dict], cfg: DataConfig) -> str:
    """The format of ``records``: ``cfg.chat_format``, or for 'auto' the first that the first record fits."""
    if cfg.chat_format != "auto":
        return cfg.chat_format
    first, name = records[0], cfg.fields.get
    if name("messages", "messages") in first:
        return "messages"
    if name("conversations", "conversations") in first:
        return "sharegpt"
    if name("instruction", "instruction") in first and name("output", "output") in first:
        return "alpaca"
    raise DataError(f"cannot tell the chat format of the records: they have {', '.join(sorted(map(str, first)))}; "
                    "expected 'messages' (role/content), 'conversations' (ShareGPT from/value) or "
                    "'instruction' + 'output' (Alpaca). Set data.chat_format (messages, sharegpt, alpaca, template) "
                    "and data.fields to name yours")


def to_messages(record: dict, index: int, kind: str, cfg: DataConfig, source: str) -> list[dict[str, str]]:
    """The conversation of one record in format ``kind``, the system prompt put first where it has none."""
    where = f"{source}, {record_place(record, index)}"
    if kind == "messages":
        messages = _listed(record, cfg.fields.get("messages", "messages"), where)
        messages = [_message(m, i, where, cfg.fields.get("role", "role"), cfg.fields.get("content", "content"), None)
                    for i, m in enumerate(messages)]
    elif kind == "sharegpt":
        messages = _listed(record, cfg.fields.get("conversations", "conversations"), where)
        messages = [_message(m, i, where, cfg.fields.get("from", "from"), cfg.fields.get("value", "value"),
                             SHAREGPT_ROLES) for i, m in enumerate(messages)]
    elif kind == "alpaca":
        messages = _alpaca(record, cfg, where)
    else:
        messages = [{"role": "user", "content": fill_template(cfg.prompt_template, record, where)},
                    {"role": "assistant", "content": fill_template(cfg.completion_template, record, where)}]
    if cfg.system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def _listed(record: dict, field: str, where: str) -> list:
    if field not in record:
        raise DataError(f"{where}: no {field!r} field (it has {', '.join(sorted(map(str, record)))}); "
                        "name the field with data.fields")
    value = record[field]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty list of messages, got {_kind(value)}")
    return value


def _message(message: Any, i: int, where: str, role_key: str, content_key: str,
             roles: dict[str, str] | None) -> dict[str, str]:
    if not isinstance(message, dict):
        raise DataError(f"{where}: message {i} must be an object with {role_key!r} and {content_key!r}, "
                        f"got {_kind(message)}")
    role = message.get(role_key)
    allowed = roles or {r: r for r in ROLES}
    if role not in allowed:
        raise DataError(f"{where}: message {i} has {'no role' if role is None else f'the unknown role {role!r}'} "
                        f"(field {role_key!r}); roles are {', '.join(allowed)}")
    if content_key not in message or message[content_key] is None:
        raise DataError(f"{where}: message {i} ({role}) has no content (field {content_key!r})")
    content = message[content_key]
    if not isinstance(content, str):
        raise DataError(f"{where}: message {i} ({role}) content must be text, got {_kind(content)}")
    return {"role": allowed[role], "content": content}


def _alpaca(record: dict, cfg: DataConfig, where: str) -> list[dict[str, str]]:
    names = {key: cfg.fields.get(key, key) for key in ("instruction", "input", "output", "system")}
    for key in ("instruction", "output"):
        value = record.get(names[key])
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: Alpaca {key} {names[key]!r} must be non-empty text, got {_kind(value)}")
    extra = record.get(names["input"]) or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: Alpaca input {names['input']!r} must be text, got {_kind(extra)}")
    user = record[names["instruction"]] + (f"\n\n{extra}" if extra.strip() else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record[names["output"]]}]
    system = record.get(names["system"])
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def fill_template(template: str, record: dict, where: str) -> str:
    """``template`` with each ``{field}`` replaced by the record's text; a missing or non-text field is a
    DataError at ``where``.

    Why not ``str.format``: it would also follow ``{field.attr}`` and ``{field[0]}`` into the record's
    objects. Templates hold plain names only (checked here too, as DataConfig checks them).
    """
    _template_fields(template)
    pieces = []
    for literal, name, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        if name is None:
            continue
        value = record.get(name)
        if value is None:
            raise DataError(f"{where}: no {name!r} for the template {template!r}")
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be text, got {_kind(value)}")
        pieces.append(value)
    return "".join(pieces)


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    if isinstance(value, (list, dict)):
        return f"{'a list' if isinstance(value, list) else 'an object'} of {len(value)}"
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"
