"""Everything together: the (train, validation) examples a training run uses."""

from __future__ import annotations

from typing import TypeVar

from ..errors import DataError
from .batches import permutation
from .config import DataConfig
from .preference_items import ITEM_KINDS, Item, PromptItem, build_items
from .sources import _looks_local, load_records
from .tasks import Example, build_examples
from .tokenizer import Tokenizer

KINDS = ("sft", *ITEM_KINDS)
"""What a run trains on: the recipe's task (sft), preference pairs, KTO examples, or GRPO prompts."""

T = TypeVar("T")


def split_train_val(items: list[T], cfg: DataConfig, seed: int) -> tuple[list[T], list[T]]:
    """Hold out a seeded random ``cfg.val_fraction`` of ``items`` (at least one if > 0), order kept."""
    if cfg.val_fraction == 0 or not items:
        return list(items), []
    n_val = max(1, round(len(items) * cfg.val_fraction))
    if n_val >= len(items):
        raise DataError(f"cannot hold out {n_val} validation example(s) from {len(items)}: "
                        "use more data, a smaller val_fraction, or val_fraction: 0")
    val_idx = set(permutation(len(items), seed)[:n_val])
    train = [e for i, e in enumerate(items) if i not in val_idx]
    val = [e for i, e in enumerate(items) if i in val_idx]
    return train, val


def subset(records: list[dict], cfg: DataConfig, seed: int) -> list[dict]:
    """The records a run uses: with max_examples, the first N of a seeded shuffle; else all, in order."""
    if cfg.max_examples is not None and cfg.max_examples < len(records):
        return [records[i] for i in permutation(len(records), seed)[:cfg.max_examples]]
    return records


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, seed: int, kind: str = "sft",
                 prompt_field: str = "prompt") -> tuple[list[Example], list[Example]] | tuple[list[Item], list[Item]]:
    """Load, subset, tokenize and split: the (train, val) examples a training run uses.

    ``kind`` is what the objective trains on. 'sft': the recipe's task (causal_lm, completion, chat);
    each document is tokenized from the tokenizer's BOS (where it has one) to its EOS, see
    :func:`~loratune.data.tasks.build_examples`. 'pairs', 'unpaired', 'prompts': TRL's preference,
    KTO and GRPO records read as such whatever ``cfg.task`` says (GRPO's prompt in ``prompt_field``),
    as :mod:`~loratune.data.preference_items` items; GRPO prompts get their ``uid``: train 0..n-1, then
    validation n..n+m-1.

    With max_examples, the first N records of a seeded shuffle of source are used. Validation
    comes from val_source when set (a local file, or else a split of the hub data set source,
    used whole), otherwise from a held-out val_fraction: of the examples, or, with packing and for
    the preference kinds, of the records before they are packed or unpaired, so that no document
    (or prompt) spans training and validation.
    """
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; one of {', '.join(KINDS)}")
    records = subset(load_records(cfg.source, cfg), cfg, seed)
    if kind != "sft":
        return _prepare_items(records, cfg, tokenizer, seq_len, seed, kind, prompt_field)
    if cfg.val_source is None and cfg.packing:
        train_records, val_records = split_train_val(records, cfg, seed)
        val = build_examples(val_records, cfg, tokenizer, seq_len, source=f"{cfg.source} (validation documents)"
                             ) if val_records else []
        return build_examples(train_records, cfg, tokenizer, seq_len), val
    train = build_examples(records, cfg, tokenizer, seq_len)
    if cfg.val_source is None:
        return split_train_val(train, cfg, seed)
    val_records, val_name = _val_records(cfg)
    return train, build_examples(val_records, cfg, tokenizer, seq_len, source=val_name)


def _val_records(cfg: DataConfig) -> tuple[list[dict], str]:
    """The records of ``cfg.val_source`` and their name for messages."""
    if _looks_local(cfg.source) or _looks_local(cfg.val_source):
        return load_records(cfg.val_source, cfg), cfg.val_source
    return load_records(cfg.source, cfg, split=cfg.val_source), f"{cfg.source} (split {cfg.val_source!r})"


def _prepare_items(records: list[dict], cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, seed: int, kind: str,
                   prompt_field: str) -> tuple[list[Item], list[Item]]:
    if cfg.val_source is None:
        train_records, val_records = split_train_val(records, cfg, seed)
        val_name = f"{cfg.source} (validation records)"
    else:
        train_records, (val_records, val_name) = records, _val_records(cfg)
    train = build_items(train_records, kind, cfg, tokenizer, seq_len, prompt_field=prompt_field)
    val = build_items(val_records, kind, cfg, tokenizer, seq_len, source=val_name,
                      prompt_field=prompt_field) if val_records else []
    for uid, item in enumerate(train + val):
        if isinstance(item, PromptItem):
            item.uid = uid
    return train, val
