"""OpenAI's answer shapes: choices, usage, server-sent events, the stop-string holdback of a stream, and the
``logprobs`` objects built from the engine's per-token (logprob, top alternatives).

Which distribution the logprobs are: the log-softmax of the logits after ``logit_bias`` and the penalties,
before temperature, top-k and top-p (those shape how a token is drawn, not how likely the model finds it). So
temperature 0 and temperature 1 report the same numbers, and a token forced by ``logit_bias`` +100 shows
logprob ~0. Token strings are each token decoded alone (a token that holds part of a character shows U+FFFD).
"""

from __future__ import annotations

import json
from typing import Any

from ..generate.engine import Logprob


def completion_logprobs(tokenizer, tokens: list[int], infos: list[Logprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions object: tokens, token_logprobs, top_logprobs, text_offset (from ``offset``)."""
    texts = [tokenizer.decode([t]) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": [lp for lp, _ in infos],
            "top_logprobs": [_by_text(tokenizer, top) for _, top in infos], "text_offset": offsets}


def _by_text(tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: logprob}; where two tokens decode alike (bytes of a split character both show U+FFFD), the
    likelier one keeps the entry (``top`` is sorted, most likely first)."""
    out: dict[str, float] = {}
    for i, v in top:
        out.setdefault(tokenizer.decode([i]), v)
    return out


def chat_logprobs(tokenizer, tokens: list[int], infos: list[Logprob]) -> dict[str, Any]:
    """The chat object: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, (lp, top) in zip(tokens, infos)]}


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (or are a split character)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in ``text`` begins (None: none there)."""
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def choice(index: int, text: str, reason: str | None, chat: bool, delta: bool,
            logprobs: dict | None = None) -> dict[str, Any]:
    """One choice of an answer: chat's ``message`` (or a streamed ``delta``), or a completion's ``text``."""
    if chat:
        key = "delta" if delta else "message"
        body = {"content": text} if delta else {"role": "assistant", "content": text}
        return {"index": index, key: body, "logprobs": logprobs, "finish_reason": reason}
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}


def usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's token counts of an answer."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict) -> str:
    """One server-sent event carrying ``obj``."""
    return f"data: {json.dumps(obj)}\n\n"
