"""Records -> examples: the causal-LM, completion and chat tasks, with labels aligned and untrained ones -100.

Each record becomes an :class:`~loratune.data.examples.Example` whose ``labels`` are aligned with
its ``input_ids`` as in transformers (``labels[i] == input_ids[i]`` where that token trains, -100
where not); the batch shifts them. Records are first turned into :class:`Encoded` s (the example
and what truncation did to it), which ``loratune data`` shows; :func:`build_examples` reports cuts
and drops, refuses a data set with nothing to train, and packs whole examples where asked.
"""

from __future__ import annotations

import logging
from collections import Counter

from ..errors import ConfigError, DataError
from .chat import ChatEncoder
from .chat_formats import _kind, chat_format, fill_template, to_messages
from .chat_template import resolve_chat_template
from .config import DataConfig, _template_fields
from .examples import IGNORE_INDEX, Encoded, Example
from .packing import pack_documents, pack_examples
from .sources import record_place
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "Encoded", "Example", "build_examples", "encode_records", "template_records"]


def _usable(records: list[dict], fields: list[str], source: str) -> list[dict]:
    """Records whose fields are all non-empty text (missing or empty ones are skipped, with a notice);
    a field that no record has, or a value that is not text (a number, NaN, a list), is an error."""
    present = set().union(*(r.keys() for r in records))
    missing = [f for f in fields if f not in present]
    if missing:
        raise DataError(f"field {missing[0]!r} is not in the records of {source}; "
                        f"they have: {', '.join(sorted(map(str, present)))}")
    for i, record in enumerate(records):  # a number or NaN would train as the text "12345" or "NaN"
        for f in fields:
            if record.get(f) is not None and not isinstance(record[f], str):
                raise DataError(f"{source}, {record_place(record, i)}: field {f!r} must be text, got "
                                f"{_kind(record[f])}; fix the record or name another field")
    kept = [r for r in records if all(r.get(f) is not None and r[f].strip() for f in fields)]
    if len(kept) < len(records):
        log.warning("skipped %d of %d records of %s with an empty or missing %s",
                    len(records) - len(kept), len(records), source, " or ".join(repr(f) for f in fields))
    return kept


def encode_records(records: list[dict], cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                   source: str) -> list[Encoded]:
    """Each record as the model will see it (causal_lm with packing: each packed block), cut to seq_len + 1.

    causal_lm: ``[bos] + encode(text) + [eos]`` (the BOS where ``tokenizer.bos_id`` has one, as
    transformers' ``tokenizer(text)`` puts it), every token after the first trained; with packing, all
    documents form one stream cut into blocks of seq_len + 1 at stride seq_len (the last partial
    block dropped). completion: ``[bos] + prompt + completion + [eos]``, only the completion trained;
    when too long the completion keeps at least half the window and the prompt loses its start after
    the bos (its end carries the 'TL;DR:' marker). chat: see :class:`~loratune.data.chat.ChatEncoder`.
    """
    bos, eos = [] if tokenizer.bos_id is None else [tokenizer.bos_id], tokenizer.eos_id
    if cfg.task == "chat":
        return _chat(records, cfg, tokenizer, seq_len, source)
    if cfg.task == "causal_lm":
        records = _usable(records, [cfg.text_field], source)
        docs = [bos + ids + [eos] for ids in tokenizer.encode_batch([r[cfg.text_field] for r in records])]
        if cfg.packing:
            return [Encoded(_all_trained(b)) for b in pack_documents(docs, seq_len)]
        return [Encoded(_all_trained(d[:seq_len + 1]), cut=_cut(len(d), seq_len), cut_inside=len(d) > seq_len + 1)
                for d in docs]
    records = _usable(records, _record_fields(cfg), source)
    prompts = tokenizer.encode_batch(_fill(cfg.prompt_template, records, source))
    completions = tokenizer.encode_batch(_fill(cfg.completion_template, records, source))
    return [_completion(bos, p, c + [eos], seq_len) for p, c in zip(prompts, completions)]


def build_examples(records: list[dict], cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                   source: str | None = None) -> list[Example]:
    """Tokenize records into examples of at most seq_len + 1 tokens (``source`` names them in errors).

    Cuts are logged; a data set where no example has a token to train is an error saying why, and
    a share of dropped examples above ``cfg.warn_dropped`` warns. With packing (completion, chat)
    whole examples share rows (:func:`~loratune.data.packing.pack_examples`).
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    source = source or cfg.source
    if not records:
        raise DataError(f"the data is empty: no records from {source}")
    encoded = encode_records(records, cfg, tokenizer, seq_len, source)
    examples = [e.example for e in encoded if e.example is not None]
    _report(encoded, examples, cfg, seq_len, source)
    if cfg.packing and cfg.task != "causal_lm":
        examples = pack_examples(examples, seq_len)
    return examples


def _report(encoded: list[Encoded], examples: list[Example], cfg: DataConfig, seq_len: int, source: str) -> None:
    why = ", ".join(f"{n} with {reason}" for reason, n in drop_reasons(encoded).items())
    cut = sum(e.cut is not None for e in encoded)
    if not examples:
        more = f" (packing needs at least {seq_len + 1} tokens in all)" if cfg.packing and cfg.task == "causal_lm" \
            else f" ({why})" if why else ""
        raise DataError(f"the data is empty: no example with a token to train from {len(encoded)} records of "
                        f"{source}{more}" + (f"; {cut} were cut to seq_len {seq_len}: raise seq_len" if cut else ""))
    dropped = len(encoded) - len(examples)
    if cut:
        inside = sum(e.cut_inside for e in encoded)
        log.info("%s: %d of %d examples were cut to %d tokens (%d by dropping whole turns, %d inside)", source, cut,
                 len(encoded), seq_len + 1, cut - inside, inside)
    if dropped and dropped / len(encoded) > cfg.warn_dropped:
        log.warning("%s: %d of %d examples (%.0f%%) have no token to train and were dropped: %s", source, dropped,
                    len(encoded), 100 * dropped / len(encoded), why)


def drop_reasons(encoded: list[Encoded]) -> dict[str, int]:
    """How many records were dropped, by reason."""
    return dict(Counter(e.dropped for e in encoded if e.dropped is not None))


def template_records(records: list[dict], cfg: DataConfig, source: str) -> list[dict]:
    """The records the prompt and completion templates can fill: those with an empty or missing field are
    skipped with a notice, as training skips them (eval --generate reads held-out records the same way)."""
    return _usable(records, _record_fields(cfg), source)


def _record_fields(cfg: DataConfig) -> list[str]:
    """The record fields the prompt and completion templates read, each once."""
    return list(dict.fromkeys(_template_fields(cfg.prompt_template) + _template_fields(cfg.completion_template)))


def _chat(records: list[dict], cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, source: str) -> list[Encoded]:
    template = resolve_chat_template(cfg.chat_template, tokenizer.chat_template, tokenizer.source)
    encoder = ChatEncoder(tokenizer, template, cfg, seq_len)
    kind = chat_format(records, cfg)
    if kind == "template":
        records = _usable(records, _record_fields(cfg), source)
    encoded = []
    for i, record in enumerate(records):
        messages = to_messages(record, i, kind, cfg, source)
        try:
            encoded.append(encoder.encode(messages))
        except DataError as exc:
            raise DataError(f"{source}, {record_place(record, i)}: {exc}") from None
    return encoded


def _fill(template: str, records: list[dict], source: str) -> list[str]:
    return [fill_template(template, r, f"{source}, {record_place(r, i)}") for i, r in enumerate(records)]


def _cut(n: int, seq_len: int) -> str | None:
    return f"cut at {seq_len + 1} of {n} tokens" if n > seq_len + 1 else None


def _all_trained(ids: list[int]) -> Example:
    return Example(ids, [IGNORE_INDEX] + ids[1:])


def _completion(bos: list[int], prompt: list[int], completion: list[int], seq_len: int) -> Encoded:
    room = seq_len + 1 - len(bos)  # the bos always stays first
    n_completion = min(len(completion), max(room - len(prompt), room // 2))
    n_prompt = min(len(prompt), room - n_completion)
    kept = bos + prompt[len(prompt) - n_prompt:]  # keep the prompt's end
    ids = kept + completion[:n_completion]
    cut = None
    if n_prompt < len(prompt) or n_completion < len(completion):
        cut = (f"cut to {len(ids)} tokens: the prompt's first {len(prompt) - n_prompt} tokens"
               + (f" and the completion's last {len(completion) - n_completion}" if n_completion < len(completion)
                  else ""))
    return Encoded(Example(ids, [IGNORE_INDEX] * len(kept) + ids[len(kept):]), cut=cut, cut_inside=cut is not None)
