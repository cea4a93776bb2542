"""Held-out prompts completed by a model and scored against their references: ROUGE-L, exact match, length.

What ``loratune eval --generate`` measures. Each record gives a prompt and the reference the model
should write: for the completion task, the filled prompt and completion templates (the prompt
encoded as training encodes it, ``[bos] + prompt``); for the chat task, the conversation up to its
last assistant turn, rendered with the template's generation prompt (as ``generate --chat``), whose
content is the reference. The model continues each prompt greedily up to its first stop id: alone by
default (a batch of one, the path of ``loratune generate``, so a completion here is the one that command
prints), or several prompts at a time, left-padded (faster; see :func:`complete`).

ROUGE-L is Google's ``rouge-score`` package, the implementation summarization papers report, so our
numbers can be set beside theirs: the F1 of the longest common subsequence of words, with its
tokenizer (lowercased runs of ``[a-z0-9]``: text in other scripts scores 0) and Porter stemming.
It is an optional extra (``pip install 'loratune[eval]'``).
"""

from __future__ import annotations

import functools
import statistics
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.chat_formats import chat_format, fill_template, to_messages
from ..data.config import DataConfig
from ..data.sources import record_place
from ..data.tasks import template_records
from ..data.tokenizer import Tokenizer
from ..errors import ConfigError, DataError
from .chat import messages_prompt
from .sampling import SamplingConfig, generate

ROUGE_SETTINGS = "rouge-score rougeL F1, Porter stemmer"
"""How ROUGE-L is computed, as a report states it."""


@dataclass(frozen=True)
class HeldOut:
    """One held-out prompt: what the model is given, and what it should write."""

    where: str
    """Where the record is ('line 12')."""
    prompt: str
    """The text the model continues: the filled prompt template, or the rendered conversation."""
    ids: list[int]
    """The prompt's token ids, as generation gets them (cut to fit, see ``cut``)."""
    stops: list[int]
    """The ids a completion ends at (EOS; in chat also the template's end-of-turn token)."""
    reference: str
    """What the model should write: the completion template filled, or the last assistant turn."""
    reference_tokens: int
    """The reference's length in tokens."""
    cut: int = 0
    """Prompt tokens dropped so that the prompt and the new tokens fit (0: none)."""


def held_out_prompts(records: list[dict], cfg: DataConfig, tokenizer: Tokenizer, room: int,
                     source: str) -> list[HeldOut]:
    """The prompt and reference of each record (task completion or chat), each prompt cut to ``room`` tokens.

    A completion prompt loses its start after the BOS (its end holds the marker, 'TL;DR:'); a chat prompt
    loses the end of its last user message (a long post keeps its instruction and beginning): as training
    cuts them. Records the templates read with an empty field are skipped with a notice, as training skips
    them; any other record without a prompt or a reference is a DataError naming it.
    """
    if cfg.task not in ("completion", "chat"):
        raise ConfigError(f"generation needs prompts and references: task completion or chat, not {cfg.task!r}")
    if not records:
        raise DataError(f"the data is empty: no records from {source}")
    if room < 1:
        raise ConfigError(f"no room for a prompt: {room} tokens")
    kind = "template" if cfg.task == "completion" else chat_format(records, cfg)
    if kind == "template":
        records = template_records(records, cfg, source)
        if not records:
            raise DataError(f"no record of {source} has a prompt and a reference: every one has an empty or "
                            "missing field the templates read")
    if cfg.task == "completion":
        return [_completion_case(r, f"{source}, {record_place(r, i)}", cfg, tokenizer, room)
                for i, r in enumerate(records)]
    return [_chat_case(to_messages(r, i, kind, cfg, source), f"{source}, {record_place(r, i)}", cfg, tokenizer, room)
            for i, r in enumerate(records)]


def _completion_case(record: dict, where: str, cfg: DataConfig, tokenizer: Tokenizer, room: int) -> HeldOut:
    prompt = fill_template(cfg.prompt_template, record, where)
    try:
        reference = fill_template(cfg.completion_template, record, where)
    except DataError as exc:
        raise DataError(f"{exc} (the completion template gives the reference to score against)") from None
    empty = [f for _, f, _, _ in string.Formatter().parse(cfg.prompt_template) if f and not record[f].strip()]
    if empty or not prompt.strip():
        what = f"its {empty[0]!r} is empty" if empty else f"the prompt template {cfg.prompt_template!r} is empty"
        raise DataError(f"{where}: no prompt ({what}): nothing to generate from")
    _check_reference(reference, where, f"completion template {cfg.completion_template!r}")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = tokenizer.encode(prompt)
    kept = ids[max(len(ids) - (room - len(bos)), 0):] if room > len(bos) else []  # the prompt's end
    if not kept:
        raise ConfigError(f"no room for the prompt of {where}: the model's context after the new tokens leaves "
                          f"{room} tokens")
    return HeldOut(where, prompt, bos + kept, list(tokenizer.eos_ids), reference, len(tokenizer.encode(reference)),
                   cut=len(ids) - len(kept))


def _chat_case(messages: list[dict[str, str]], where: str, cfg: DataConfig, tokenizer: Tokenizer,
               room: int) -> HeldOut:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: no assistant message, so no reference to score against (the last assistant "
                        "turn is the reference)")
    reference, context = messages[last]["content"], messages[:last]
    _check_reference(reference, where, f"assistant message {last}")
    if not any(m["role"] == "user" for m in context):
        raise DataError(f"{where}: no user message before the last assistant turn: nothing to prompt with")

    def render(msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        return messages_prompt(tokenizer, msgs, cfg.chat_template, **cfg.template_kwargs)

    ids, stops = render(context)
    cut = 0
    if len(ids) > room:  # the last user message keeps the longest start that fits (bisection over its tokens)
        u = max(i for i, m in enumerate(context) if m["role"] == "user")
        words = tokenizer.encode(context[u]["content"])

        def shortened(k: int) -> tuple[list[int], list[int]]:
            return render([*context[:u], {**context[u], "content": tokenizer.decode(words[:k])}, *context[u + 1:]])

        if len(shortened(0)[0]) > room:
            raise ConfigError(f"no room for the prompt of {where}: even without its last user message it takes "
                              f"{len(shortened(0)[0])} tokens, and {room} are left after the new ones")
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(shortened(mid)[0]) <= room else (lo, mid - 1)
        ids, stops = shortened(lo)
        cut = len(words) - lo
    return HeldOut(where, tokenizer.decode(ids), ids, stops, reference, len(tokenizer.encode(reference)), cut=cut)


def _check_reference(reference: str, where: str, what: str) -> None:
    if not reference.strip():
        raise DataError(f"{where}: the reference ({what}) is empty: nothing to score against")


@dataclass(frozen=True)
class Completion:
    """What a model wrote for one prompt."""

    text: str
    """The new tokens decoded, up to the first stop id (not included)."""
    tokens: int
    """How many tokens it wrote before the stop."""
    finished: bool
    """Whether it stopped on a stop id (False: it ran to max_new_tokens)."""


def complete(model: torch.nn.Module, cases: Sequence[HeldOut], tokenizer: Tokenizer,
             max_new_tokens: int) -> list[Completion]:
    """The greedy completions of ``cases`` generated as one batch, each cut at its first stop id.

    One case is exactly the path of ``loratune generate`` (the same ids, no mask), so its completion is
    the one that command prints. Several are left-padded with an attention mask: faster (each decoding
    step reads the weights once for all rows), and equal to one at a time up to float rounding, which can
    flip a token where two are within rounding of each other.
    """
    device = next(model.parameters()).device
    width = max(len(c.ids) for c in cases)
    stops = list(dict.fromkeys(t for c in cases for t in c.stops))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else stops[0]
    ids = torch.tensor([[pad] * (width - len(c.ids)) + c.ids for c in cases], device=device)  # (B, T)
    mask = None
    if any(len(c.ids) < width for c in cases):
        mask = torch.tensor([[0] * (width - len(c.ids)) + [1] * len(c.ids) for c in cases], device=device)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    rows = generate(model, ids, cfg, eos_ids=stops, attention_mask=mask).tolist()  # (B, <= max_new_tokens)
    done = []
    for case, new in zip(cases, rows):
        end = next((i for i, t in enumerate(new) if t in case.stops), None)
        new = new if end is None else new[:end]
        done.append(Completion(tokenizer.decode(new), len(new), end is not None))
    return done


def complete_all(model: torch.nn.Module, cases: Sequence[HeldOut], tokenizer: Tokenizer, max_new_tokens: int,
                 batch_size: int = 1, progress: Callable[[int], None] | None = None) -> list[Completion]:
    """The completions of every case, in order, ``batch_size`` prompts at a time (prompts of similar length
    together: less padding); ``progress`` is told how many are done every 10 prompts and at the end."""
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].ids))
    done: dict[int, Completion] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        done.update(zip(rows, complete(model, [cases[i] for i in rows], tokenizer, max_new_tokens)))
        if progress is not None and (len(done) // 10 > (len(done) - len(rows)) // 10 or len(done) == len(cases)):
            progress(len(done))
    return [done[i] for i in range(len(cases))]


@dataclass(frozen=True)
class Scores:
    """One completion scored against its reference."""

    rouge_l: float
    """ROUGE-L F1 (rouge-score, stemmed), in [0, 1]."""
    exact: bool
    """The completion equals the reference once surrounding whitespace is stripped."""
    tokens: int
    """The completion's tokens."""
    words: int
    """The completion's whitespace-separated words."""
    finished: bool
    """It ended on a stop id, not at max_new_tokens."""


@functools.cache
def _rouge():
    try:
        from rouge_score import rouge_scorer, tokenizers
    except ImportError:
        raise ConfigError("ROUGE-L needs the rouge-score package, which is not installed: "
                          "pip install 'loratune[eval]'") from None
    # the default tokenizer passed explicitly: the same scores, without absl's "Using default tokenizer." on stderr
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))


def require_rouge() -> None:
    """Fail early (ConfigError, one line) where rouge-score is missing, before a model is loaded."""
    _rouge()


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F1 of ``generated`` against ``reference`` (rouge-score's, stemmed); 0 for an empty text."""
    return float(_rouge().score(reference, generated)["rougeL"].fmeasure)


def score(completion: Completion, reference: str) -> Scores:
    """The scores of one completion."""
    return Scores(rouge_l(completion.text, reference), completion.text.strip() == reference.strip(),
                  completion.tokens, len(completion.text.split()), completion.finished)


def summarize(scores: Sequence[Scores]) -> dict[str, Any]:
    """Means over examples: ROUGE-L, exact-match rate, tokens, words; and how many finished on a stop id."""
    if not scores:
        raise DataError("no completions to summarize")
    mean = lambda key: statistics.fmean(getattr(s, key) for s in scores)  # noqa: E731
    return {"rouge_l": mean("rouge_l"), "exact": mean("exact"), "tokens": mean("tokens"), "words": mean("words"),
            "finished": sum(s.finished for s in scores)}


def difference(base: Sequence[Scores], adapter: Sequence[Scores]) -> dict[str, Any]:
    """Adapter minus base on the same prompts: the mean differences, and per example how often the adapter's
    ROUGE-L is higher, lower or the same."""
    if len(base) != len(adapter):
        raise ValueError(f"{len(base)} base and {len(adapter)} adapter scores: not the same prompts")
    a, b = summarize(adapter), summarize(base)
    pairs = list(zip(base, adapter))
    return {**{k: a[k] - b[k] for k in ("rouge_l", "exact", "tokens", "words")},
            "better": sum(y.rouge_l > x.rouge_l for x, y in pairs),
            "worse": sum(y.rouge_l < x.rouge_l for x, y in pairs),
            "same": sum(y.rouge_l == x.rouge_l for x, y in pairs)}
