"""Where training text comes from and how it becomes sequences: :class:`DataConfig`."""

from __future__ import annotations

import string
from dataclasses import dataclass

from ..errors import ConfigError

TASKS = ("causal_lm", "completion")


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

