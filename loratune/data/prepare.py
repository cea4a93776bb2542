"""Everything together: the (train, validation) examples a training run uses."""

from __future__ import annotations

from typing import TypeVar

from ..errors import DataError
from .batches import permutation
from .config import DataConfig
from .sources import _looks_local, load_records
from .tasks import Example, build_examples
from .tokenizer import Tokenizer

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


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                 seed: int, kind: str = "sft") -> tuple[list[Example], list[Example]]:
    """Load, subset, tokenize and split: the (train, val) examples a training run uses.

    Each document is tokenized from the tokenizer's BOS (where it has one) to its EOS, see
    :func:`~loratune.data.tasks.build_examples`.

    With max_examples, the first N records of a seeded shuffle of source are used. Validation
    comes from val_source when set (a local file, or else a split of the hub data set source,
    used whole), otherwise from a held-out val_fraction: of the examples, or, with packing, of
    the documents before they are packed, so that no document spans training and validation.
    """
    records = subset(load_records(cfg.source, cfg), cfg, seed)
    if cfg.val_source is None and cfg.packing:
        train_records, val_records = split_train_val(records, cfg, seed)
        val = build_examples(val_records, cfg, tokenizer, seq_len, source=f"{cfg.source} (validation documents)"
                             ) if val_records else []
        return build_examples(train_records, cfg, tokenizer, seq_len), val
    train = build_examples(records, cfg, tokenizer, seq_len)
    if cfg.val_source is None:
        return split_train_val(train, cfg, seed)
    if _looks_local(cfg.source) or _looks_local(cfg.val_source):
        val_records, val_name = load_records(cfg.val_source, cfg), cfg.val_source
    else:
        val_records = load_records(cfg.source, cfg, split=cfg.val_source)
        val_name = f"{cfg.source} (split {cfg.val_source!r})"
    return train, build_examples(val_records, cfg, tokenizer, seq_len, source=val_name)
