"""Preference, KTO and GRPO records as TRL reads them, checked, before any tokenizing.

The formats are TRL's (``trl/data_utils.py``), each field either text ('standard') or a list of
``{"role", "content"}`` messages ('conversational'):

- **pairs** (dpo, ipo, orpo, simpo): ``{"prompt", "chosen", "rejected"}``; conversational: the prompt is
  the conversation so far and chosen / rejected the assistant's answers. Or with the prompt implicit,
  ``{"chosen", "rejected"}`` as whole texts or conversations: the prompt is their common prefix, as
  TRL's ``extract_prompt`` cuts it (also when a text ``prompt`` sits beside conversational pairs, as its
  ``maybe_extract_prompt`` does).
- **unpaired** (kto): ``{"prompt", "completion", "label"}``, ``label`` a boolean (true: desirable). A
  pairs file is unpaired as TRL's ``unpair_preference_dataset`` does: each chosen becomes a desirable
  example and each rejected an undesirable one, the rejected of a chunk of 1,000 records after its chosen.
- **prompts** (grpo): the prompt in one named field (the recipe's ``grpo.prompt_field``); the whole
  record stays with it for the reward functions.

Each kind is read as such whatever ``data.task`` says, so a recipe written for another task trains on
a preference file by naming it (``--data pairs.jsonl --set objective=dpo``). A record that does not
fit is a DataError naming where it is (``line 12``) and what to do; a pair whose chosen and rejected
are the same is trained but warned about (it teaches nothing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .chat_formats import _kind
from .sources import record_place

log = logging.getLogger(__name__)

Content = str | list[dict[str, Any]]
"""A text, or a conversation (a list of messages)."""

UNPAIR_CHUNK = 1000
"""Records per chunk of TRL's ``unpair_preference_dataset`` (``datasets.map(batched=True)``'s default)."""

PAIRS_FORMAT = ('TRL\'s preference format {"prompt", "chosen", "rejected"} (texts or lists of messages), or '
                '{"chosen", "rejected"} with the prompt inside both')
UNPAIRED_FORMAT = ('TRL\'s unpaired format {"prompt", "completion", "label"} (label true or false), or a '
                   'preference file {"prompt", "chosen", "rejected"}, which is unpaired')


@dataclass
class Pair:
    """A preference pair, prompt explicit: texts, or the conversation so far and the assistant's answers."""

    prompt: Content
    chosen: Content
    rejected: Content
    where: str
    """Where the record is ('line 3'), for messages."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """The record's own ``chat_template_kwargs`` (TRL passes them to the template)."""

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class Unpaired:
    """A KTO example: a prompt, one completion and whether it is desirable."""

    prompt: Content
    completion: Content
    desirable: bool
    where: str
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


@dataclass
class Prompt:
    """A GRPO prompt and the record it came from (reward functions read its other fields)."""

    prompt: Content
    record: dict[str, Any]
    where: str
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def read_pairs(records: list[dict], source: str) -> list[Pair]:
    """The pairs of ``records`` (explicit or implicit prompt, texts or conversations), checked; a pair
    whose chosen and rejected are equal is kept and warned about, with where those records are."""
    pairs, same = [], []
    for i, record in enumerate(records):
        where = f"{source}, {record_place(record, i)}"
        pair = _pair(record, where)
        if pair.chosen == pair.rejected:
            same.append(record_place(record, i))
        pairs.append(pair)
    if same:
        shown = ", ".join(same[:5]) + (f" and {len(same) - 5} more" if len(same) > 5 else "")
        log.warning("%s: %d of %d pairs have the same chosen and rejected (%s): they teach nothing; fix or remove "
                    "them", source, len(same), len(records), shown)
    return pairs


def read_unpaired(records: list[dict], source: str) -> list[Unpaired]:
    """KTO's examples of ``records``; a preference file (its first record has chosen and rejected) is
    unpaired as TRL does: chosen -> desirable, rejected -> undesirable (see :func:`unpair`)."""
    if "chosen" in records[0] and "rejected" in records[0]:
        return unpair(read_pairs(records, source))
    examples = []
    for i, record in enumerate(records):
        where = f"{source}, {record_place(record, i)}"
        _require(record, ("prompt", "completion", "label"), where, UNPAIRED_FORMAT)
        completion = _content(record["completion"], "completion", where)
        prompt = _content(record["prompt"], "prompt", where, empty_text=True)
        if isinstance(prompt, list) != isinstance(completion, list):
            raise DataError(f"{where}: the prompt is {_form(prompt)} but the completion {_form(completion)}: give "
                            "both as texts, or both as lists of messages")
        label = record["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: label must be true (a desirable completion) or false (an undesirable one), "
                            f"got {_kind(label)}; write it as a JSON boolean")
        examples.append(Unpaired(prompt, completion, label, where, _template_kwargs(record, where)))
    return examples


def read_prompts(records: list[dict], prompt_field: str, source: str) -> list[Prompt]:
    """GRPO's prompts: the text or conversation in ``prompt_field`` of each record, which is kept whole."""
    prompts = []
    for i, record in enumerate(records):
        where = f"{source}, {record_place(record, i)}"
        if prompt_field not in record:
            raise DataError(f"{where}: no prompt field {prompt_field!r}; the record has "
                            f"{_fields(record)}. Name the field that holds the prompt with grpo.prompt_field "
                            "(a text, or a list of messages)")
        value = record[prompt_field]
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
            raise DataError(f"{where}: the prompt {prompt_field!r} is empty; give every record a prompt, or remove "
                            "this one")
        prompts.append(Prompt(_content(value, prompt_field, where), dict(record), where,
                              _template_kwargs(record, where)))
    return prompts


def unpair(pairs: list[Pair]) -> list[Unpaired]:
    """Each pair as two KTO examples, in TRL's order: per chunk of :data:`UNPAIR_CHUNK` pairs, the chosen
    completions (desirable) and then the rejected ones (undesirable)."""
    examples = []
    for start in range(0, len(pairs), UNPAIR_CHUNK):
        chunk = pairs[start:start + UNPAIR_CHUNK]
        for desirable in (True, False):
            examples += [Unpaired(p.prompt, p.chosen if desirable else p.rejected, desirable,
                                  f"{p.where} ({'chosen' if desirable else 'rejected'})", p.template_kwargs)
                         for p in chunk]
    return examples


def extract_prompt(chosen: Content, rejected: Content) -> tuple[Content, Content, Content]:
    """(prompt, chosen, rejected): the common prefix of two whole texts or conversations and the rests,
    as TRL's ``extract_prompt`` cuts them: a text prompt gives up a space it ends with (the completion
    starts with it), and when one is a prefix of the other the prompt stops one item before the
    shorter ends. One departure: where they differ at once, TRL would look at the item before the
    first (the last) for that space; here the prompt is simply empty."""
    n = min(len(chosen), len(rejected))
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    idx = max(idx, 0)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _pair(record: dict, where: str) -> Pair:
    _require(record, ("chosen", "rejected"), where, PAIRS_FORMAT,
             hint="it looks like KTO's unpaired format: use objective kto" if "completion" in record else "")
    chosen = _content(record["chosen"], "chosen", where)
    rejected = _content(record["rejected"], "rejected", where)
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(f"{where}: chosen is {_form(chosen)} but rejected {_form(rejected)}: give both as texts, "
                        "or both as lists of messages")
    kwargs = _template_kwargs(record, where)
    prompt = record.get("prompt")
    if prompt is not None and isinstance(prompt, list) == isinstance(chosen, list):
        prompt = _content(prompt, "prompt", where, empty_text=True)
        return Pair(prompt, chosen, rejected, where, kwargs)
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: 'prompt' must be text or a list of messages, got {_kind(prompt)}")
    # no prompt, or a text prompt beside conversations (TRL's maybe_extract_prompt): the prompt is implicit
    prompt, chosen_rest, rejected_rest = extract_prompt(chosen, rejected)
    if isinstance(chosen, list) and not prompt:
        raise DataError(f"{where}: chosen and rejected share no first message, so there is no prompt to answer; "
                        "give a 'prompt' (the conversation so far) and the answers as chosen and rejected")
    return Pair(prompt, chosen_rest, rejected_rest, where, kwargs)


def _require(record: dict, names: tuple[str, ...], where: str, expected: str, hint: str = "") -> None:
    missing = [n for n in names if n not in record or record[n] is None]
    if missing:
        raise DataError(f"{where}: no {' or '.join(repr(n) for n in missing)} field; the record has "
                        f"{_fields(record)}. Expected {expected}" + (f" ({hint})" if hint else ""))


def _content(value: Any, name: str, where: str, empty_text: bool = False) -> Content:
    """A text or a list of messages, checked: non-empty (an empty prompt text allowed where ``empty_text``)."""
    if isinstance(value, str):
        if not value.strip() and not empty_text:
            raise DataError(f"{where}: {name} is empty; give it a text (or remove the record)")
        return value
    if not isinstance(value, list):
        raise DataError(f"{where}: {name} must be a text or a list of messages, got {_kind(value)}")
    if not value:
        raise DataError(f"{where}: {name} is an empty list of messages; give it at least one message")
    for k, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: {name} message {k} must be an object with a 'role' and a 'content', got "
                            f"{_kind(message)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {name} message {k} ({message['role']}) content must be text, got "
                            f"{_kind(message.get('content'))}")
    return value


def _template_kwargs(record: dict, where: str) -> dict[str, Any]:
    kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise DataError(f"{where}: chat_template_kwargs must be an object of template variables, got {_kind(kwargs)}")
    return kwargs


def _fields(record: dict) -> str:
    return ", ".join(repr(str(k)) for k in record) or "no fields"


def _form(value: Content) -> str:
    return "a list of messages" if isinstance(value, list) else "a text"
