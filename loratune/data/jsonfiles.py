"""Small readers for a model directory's JSON side files (tokenizer_config.json, generation_config.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def json_or_empty(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
