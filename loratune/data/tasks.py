"""Records -> examples: the causal-LM and completion tasks, with labels shifted and the prompt masked.

Each record becomes an :class:`Example` whose ``labels`` are already shifted by one
(``labels[t]`` is the token after ``input_ids[t]``, -100 where no loss is taken), so the
training loop's loss is plain cross-entropy over every position with a label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ConfigError, DataError
from .config import DataConfig, _template_fields
from .packing import pack_documents
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Example:
    """One training sequence; ``labels[t]`` is the target after ``input_ids[t]`` (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]


def _usable(records: list[dict], fields: list[str], source: str) -> list[dict]:
    """Records whose fields are all non-empty; a field that no record has is an error."""
    present = set().union(*(r.keys() for r in records))
    missing = [f for f in fields if f not in present]
    if missing:
        raise DataError(f"field {missing[0]!r} is not in the records of {source}; "
                        f"they have: {', '.join(sorted(map(str, present)))}")
    kept = [r for r in records if all(r.get(f) is not None and str(r[f]).strip() for f in fields)]
    if len(kept) < len(records):
        log.warning("skipped %d of %d records of %s with an empty or missing %s",
                    len(records) - len(kept), len(records), source, " or ".join(repr(f) for f in fields))
    return kept


def build_examples(records: list[dict], cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                   source: str | None = None) -> list[Example]:
    """Tokenize records into examples of at most ``seq_len`` tokens (``source`` names them in errors).

    A document starts with the tokenizer's BOS where it has one (``tokenizer.bos_id``: Llama,
    Gemma), as transformers' ``tokenizer(text)`` starts it, and ends with EOS; without a BOS
    (GPT-2, Qwen) it is ``encode(text) + [eos]``.

    causal_lm: ``ids = [bos] + encode(text) + [eos]`` cut to seq_len + 1, then input = ids[:-1],
    labels = ids[1:]. With packing, all documents (each from its bos to its eos) form one stream
    cut into blocks of seq_len + 1 at stride seq_len; the last partial block is dropped.
    completion: ids = [bos] + prompt + completion + [eos]; when too long the completion keeps at
    least half the window and the prompt loses its start after the bos (its end carries the
    'TL;DR:' marker). Labels are -100 wherever the target is a prompt token (the bos included).
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    source = source or cfg.source
    if not records:
        raise DataError(f"the data is empty: no records from {source}")
    bos, eos = [] if tokenizer.bos_id is None else [tokenizer.bos_id], tokenizer.eos_id
    if cfg.task == "causal_lm":
        records = _usable(records, [cfg.text_field], source)
        docs = [bos + ids + [eos] for ids in tokenizer.encode_batch([str(r[cfg.text_field]) for r in records])]
        blocks = pack_documents(docs, seq_len) if cfg.packing else [d[:seq_len + 1] for d in docs]
        examples = [_shifted(b) for b in blocks]
    else:
        fields = _template_fields(cfg.prompt_template) + _template_fields(cfg.completion_template)
        fields = list(dict.fromkeys(fields))
        records = _usable(records, fields, source)
        prompts = tokenizer.encode_batch(_fill(cfg.prompt_template, records, source))
        completions = tokenizer.encode_batch(_fill(cfg.completion_template, records, source))
        examples = [_completion(bos, p, c + [eos], seq_len) for p, c in zip(prompts, completions)]
    if not examples:
        more = f" (packing needs at least {seq_len + 1} tokens in all)" if cfg.packing and records else ""
        raise DataError(f"the data is empty: no usable examples from {len(records)} records of {source}{more}")
    return examples


def _fill(template: str, records: list[dict], source: str) -> list[str]:
    texts = []
    for i, record in enumerate(records):
        try:
            texts.append(template.format(**record))
        except (KeyError, AttributeError, IndexError, TypeError, ValueError, OverflowError) as exc:
            # {field.attr}, {field[0]}, {field:d} or a nested {x} in a format spec that the record does not fit
            raise DataError(f"record {i} of {source} does not fit the template {template!r} "
                            f"({type(exc).__name__}: {exc})") from None
    return texts


def _shifted(ids: list[int], n_prompt: int = 0) -> Example:
    # ids[t + 1] is the target at position t; it is masked while it still belongs to the prompt.
    labels = [IGNORE_INDEX if t + 1 < n_prompt else tok for t, tok in enumerate(ids[1:])]
    return Example(input_ids=ids[:-1], labels=labels)


def _completion(bos: list[int], prompt: list[int], completion: list[int], seq_len: int) -> Example:
    room = seq_len + 1 - len(bos)  # the bos always stays first
    n_completion = min(len(completion), max(room - len(prompt), room // 2))
    n_prompt = min(len(prompt), room - n_completion)
    prompt = bos + prompt[len(prompt) - n_prompt:]  # keep the prompt's end
    return _shifted(prompt + completion[:n_completion], n_prompt=len(prompt))

