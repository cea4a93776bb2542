"""Text records -> token sequences -> deterministic, resumable batches.

Records come from a local file (.jsonl, .json, .csv, .parquet, .txt) or a Hugging Face hub
data set. Each record becomes an :class:`Example` whose ``labels`` are already shifted by one
(``labels[t]`` is the token after ``input_ids[t]``, -100 where no loss is taken), so the
training loop's loss is plain cross-entropy over every position with a label.
"""

from __future__ import annotations

import csv
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import is_hub_id
from .errors import ConfigError, DataError
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TASKS = ("causal_lm", "completion")
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes training sequences."""

    source: str = "ctr4si/reddit_tifu"
    """Local file (.jsonl/.json/.csv/.parquet/.txt) or a Hugging Face hub data set id."""
    hub_config: str | None = "long"
    """Configuration name of the hub data set (ignored for local files)."""
    split: str = "train"
    """Split of the hub data set (ignored for local files)."""
    task: str = "causal_lm"
    """'causal_lm': plain LM on text_field; 'completion': prompt -> completion, loss on the completion only."""
    text_field: str = "documents"
    """Record field that causal_lm trains on (a .txt file's records have the single field 'text')."""
    prompt_template: str = "{documents}\nTL;DR: "
    """str.format over a record: the prompt of the completion task (no loss on it)."""
    completion_template: str = "{tldr}"
    """str.format over a record: the completion the model learns to write after the prompt."""
    packing: bool = False
    """causal_lm: concatenate documents (EOS between) and cut full seq_len blocks instead of truncating each."""
    max_examples: int | None = None
    """Use only the first N records of source, after a seeded shuffle (a quick subset)."""
    val_source: str | None = None
    """Validation data: a local file, or a split name of the hub data set source; None holds out val_fraction."""
    val_fraction: float = 0.05
    """Fraction of examples held out for validation when val_source is None (at least 1 if > 0)."""
    shuffle: bool = True
    """Shuffle the training order each epoch (seeded, so a run can resume mid-epoch)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown data task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_examples is not None and self.max_examples <= 0:
            raise ConfigError(f"max_examples must be None or > 0, got {self.max_examples}")
        if self.packing and self.task != "causal_lm":
            raise ConfigError("packing applies to the causal_lm task only")
        if not self.text_field:
            raise ConfigError("text_field must name a record field")
        for name in ("prompt_template", "completion_template"):
            _template_fields(getattr(self, name), name)


def _template_fields(template: str, what: str = "template") -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{what} {template!r} does not parse: {exc}") from None
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        base = field.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise ConfigError(f"{what} {template!r} must use named fields like {{documents}}, not {{{field}}}")
        fields.append(base)
    return fields


# --- loading records ---------------------------------------------------------------------------

def _looks_local(source: str) -> bool:
    return (Path(source).expanduser().exists() or Path(source).suffix.lower() in FILE_TYPES
            or source.startswith((".", "/", "~")) or not is_hub_id(source))


def load_records(source: str, cfg: DataConfig, split: str | None = None) -> list[dict]:
    """Read a data set as a list of dicts, one per record.

    A local file is read by its extension: .jsonl (one JSON object a line), .json (a list of
    objects, or {"data": [...]}), .csv (header row = field names, values are strings),
    .parquet (needs pyarrow), .txt (one record {"text": line} per non-empty line). Anything
    else shaped like 'user/name' is a hub id, loaded with
    ``datasets.load_dataset(source, cfg.hub_config, split=split or cfg.split)``.
    """
    if not _looks_local(source):
        records = _load_hub(source, cfg.hub_config, split or cfg.split)
        where = f"hub data set {source!r} (split {split or cfg.split!r})"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        if not path.is_file():
            raise DataError(f"{path} is not a file; pass a {'/'.join(FILE_TYPES)} file or a hub data set id")
        kind = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
                   ".parquet": _read_parquet, ".txt": _read_txt}
        if kind not in readers:
            raise DataError(f"cannot read {path}: unknown extension {kind!r}; use one of {', '.join(FILE_TYPES)}")
        try:
            records = readers[kind](path)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text: {exc}") from None
        where = str(path)
    if not records:
        raise DataError(f"the data is empty: no records in {where}")
    return records


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            except (ValueError, RecursionError) as exc:  # a number past 4300 digits, nesting past the recursion limit
                raise DataError(f"{path}, line {lineno}: unreadable JSON ({exc})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # a number past 4300 digits, nesting past the recursion limit
        raise DataError(f"{path}: unreadable JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path} must hold a list of JSON objects, or an object {{\"data\": [...]}}")
    return data


def _read_csv(path: Path) -> list[dict]:
    old_limit = csv.field_size_limit(2**31 - 1)  # long documents exceed the 128 KiB default
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return [dict(row) for row in csv.DictReader(f)]
    except csv.Error as exc:
        raise DataError(f"{path} is not valid CSV: {exc}") from None
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow, or convert it to .jsonl") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path} is not a readable parquet file: {exc}") from None


def _read_txt(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig") as f:
        return [{"text": line.rstrip("\r\n")} for line in f if line.strip()]


def _load_hub(source: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source!r} is not a local file, and loading hub data sets needs the 'datasets' "
                        "package: pip install datasets, or pass a local .jsonl file") from None
    try:
        return datasets.load_dataset(source, config, split=split).to_list()
    except Exception as exc:  # network, missing data set, bad config or split: all mean "could not get it"
        raise DataError(f"could not load hub data set {source!r} (config {config!r}, split {split!r}): "
                        f"{type(exc).__name__}: {exc}. Check the id and your connection, "
                        "or pass a local .jsonl/.json/.csv/.parquet/.txt file") from None


# --- records -> examples -----------------------------------------------------------------------

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

    causal_lm: ``ids = encode(text) + [eos]`` cut to seq_len + 1, then input = ids[:-1],
    labels = ids[1:]. With packing, all documents (each followed by eos) form one stream cut
    into blocks of seq_len + 1 at stride seq_len; the last partial block is dropped.
    completion: ids = prompt + completion + [eos]; when too long the completion keeps at least
    half the window and the prompt loses its start (its end carries the 'TL;DR:' marker).
    Labels are -100 wherever the target is a prompt token.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    source = source or cfg.source
    if not records:
        raise DataError(f"the data is empty: no records from {source}")
    eos = tokenizer.eos_id
    if cfg.task == "causal_lm":
        records = _usable(records, [cfg.text_field], source)
        docs = [ids + [eos] for ids in tokenizer.encode_batch([str(r[cfg.text_field]) for r in records])]
        examples = _packed(docs, seq_len) if cfg.packing else [_shifted(d[:seq_len + 1]) for d in docs]
    else:
        fields = _template_fields(cfg.prompt_template) + _template_fields(cfg.completion_template)
        fields = list(dict.fromkeys(fields))
        records = _usable(records, fields, source)
        prompts = tokenizer.encode_batch(_fill(cfg.prompt_template, records, source))
        completions = tokenizer.encode_batch(_fill(cfg.completion_template, records, source))
        examples = [_completion(p, c + [eos], seq_len) for p, c in zip(prompts, completions)]
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


def _packed(docs: list[list[int]], seq_len: int) -> list[Example]:
    stream = [tok for doc in docs for tok in doc]
    return [_shifted(stream[start:start + seq_len + 1])
            for start in range(0, len(stream) - seq_len, seq_len)]


def _completion(prompt: list[int], completion: list[int], seq_len: int) -> Example:
    room = seq_len + 1
    n_completion = min(len(completion), max(room - len(prompt), room // 2))
    n_prompt = min(len(prompt), room - n_completion)
    prompt = prompt[len(prompt) - n_prompt:]  # keep the prompt's end
    return _shifted(prompt + completion[:n_completion], n_prompt=n_prompt)


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def split_train_val(examples: list[Example], cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random ``cfg.val_fraction`` of the examples (at least one if > 0)."""
    if cfg.val_fraction == 0 or not examples:
        return list(examples), []
    n_val = max(1, round(len(examples) * cfg.val_fraction))
    if n_val >= len(examples):
        raise DataError(f"cannot hold out {n_val} validation example(s) from {len(examples)}: "
                        "use more data, a smaller val_fraction, or val_fraction: 0")
    order = _permutation(len(examples), seed)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


# --- batching ----------------------------------------------------------------------------------

class Batches:
    """Deterministic, resumable batching over a fixed list of examples.

    Epoch e's order is a torch.randperm seeded from (seed, e), and ``batch(e, i)`` depends on
    nothing else, so resuming a run at a step needs only (epoch, index) and no sampler state.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int = 0, shuffle: bool = True,
                 pad_id: int = 50256, drop_last: bool = True) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.shuffle, self.pad_id, self.drop_last = shuffle, pad_id, drop_last
        if examples and len(self) == 0:
            raise DataError(f"{len(examples)} examples make no full batch of {batch_size}: "
                            "lower the batch size or use more data")
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> list[int]:
        """Example indices in epoch ``epoch``'s order."""
        if not self.shuffle:
            return list(range(len(self.examples)))
        if self._cached is None or self._cached[0] != epoch:
            mixed = (self.seed * 0x9E3779B97F4A7C15 + epoch) % 2**63  # one seed per (seed, epoch)
            self._cached = (epoch, _permutation(len(self.examples), mixed))
        return self._cached[1]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of epoch ``epoch``: input_ids and labels (B, T), right-padded to the longest."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches per epoch")
        start = index * self.batch_size
        picked = [self.examples[i] for i in self.order(epoch)[start:start + self.batch_size]]
        T = max(len(e.input_ids) for e in picked)
        input_ids = torch.full((len(picked), T), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(picked), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, e in enumerate(picked):
            input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[row, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of epoch 0, in order (convenient for evaluation)."""
        return (self.batch(0, i) for i in range(len(self)))


# --- all together ------------------------------------------------------------------------------

def prepare_data(cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                 seed: int) -> tuple[list[Example], list[Example]]:
    """Load, subset, tokenize and split: the (train, val) examples a training run uses.

    With max_examples, the first N records of a seeded shuffle of source are used. Validation
    comes from val_source when set (a local file, or else a split of the hub data set source,
    used whole), otherwise from a held-out val_fraction of the training examples.
    """
    records = load_records(cfg.source, cfg)
    if cfg.max_examples is not None and cfg.max_examples < len(records):
        records = [records[i] for i in _permutation(len(records), seed)[:cfg.max_examples]]
    train = build_examples(records, cfg, tokenizer, seq_len)
    if cfg.val_source is None:
        return split_train_val(train, cfg, seed)
    if _looks_local(cfg.source) or _looks_local(cfg.val_source):
        val_records, val_name = load_records(cfg.val_source, cfg), cfg.val_source
    else:
        val_records = load_records(cfg.source, cfg, split=cfg.val_source)
        val_name = f"{cfg.source} (split {cfg.val_source!r})"
    return train, build_examples(val_records, cfg, tokenizer, seq_len, source=val_name)

