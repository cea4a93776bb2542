"""Where training text comes from and how it becomes sequences: :class:`DataConfig`."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .chat_template import check_template_variables

DEFAULT_SOURCE = "ctr4si/reddit_tifu"
TASKS = ("causal_lm", "completion", "chat")
CHAT_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "template")
TRAIN_ON = ("assistant", "last_assistant", "all")
TRUNCATIONS = ("keep_start", "keep_end")
FIELD_NAMES = ("messages", "role", "content", "conversations", "from", "value", "instruction", "input", "output",
               "system")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes training sequences."""

    source: str = DEFAULT_SOURCE
    """Local file (.jsonl/.json/.csv/.parquet/.txt) or a Hugging Face hub data set id."""
    hub_config: str | None = "auto"
    """Configuration name of the hub data set (ignored for local files); 'auto': 'long' for the default
    ctr4si/reddit_tifu, none for any other source."""
    split: str = "train"
    """Split of the hub data set (ignored for local files)."""
    task: str = "causal_lm"
    """'causal_lm': plain LM on text_field; 'completion': prompt -> completion, loss on the completion only;
    'chat': conversations through the model's chat template, loss on the assistant turns (see train_on).
    The sft objective's only: the preference, KTO and GRPO objectives read TRL's record formats whatever it says
    (see data/preference_formats.py)."""
    text_field: str = "documents"
    """Record field that causal_lm trains on (a .txt file's records have the single field 'text')."""
    prompt_template: str = "{documents}\nTL;DR: "
    """The prompt of the completion task (no loss on it): text with plain {field} names of a record."""
    completion_template: str = "{tldr}"
    """The completion the model learns to write after the prompt: text with plain {field} names."""
    packing: bool = False
    """causal_lm: concatenate documents (EOS between) and cut full seq_len blocks instead of truncating each.
    completion, chat: several whole examples per row, positions restarting at each and attention
    block-diagonal, so no example sees another (the same loss as unpacked, less padding)."""
    chat_format: str = "auto"
    """chat: 'messages' (OpenAI role/content), 'sharegpt' (conversations of from/value), 'alpaca'
    (instruction/input/output), 'template' (prompt_template as the user turn, completion_template as the
    assistant's); 'auto' picks by the fields of the first record."""
    fields: dict[str, str] = field(default_factory=dict)
    """chat: the record's names for loratune's fields, e.g. {messages: dialog, role: speaker, content: text}
    (keys: messages, role, content, conversations, from, value, instruction, input, output, system)."""
    chat_template: str | None = None
    """chat: None uses the model's template; else a .jinja file or a named one ('chatml')."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """chat: extra variables for the template, e.g. {enable_thinking: false} for Qwen3."""
    system_prompt: str | None = None
    """chat: a system message put first in every conversation that has none."""
    train_on: str = "assistant"
    """chat: 'assistant' (every assistant turn with its end-of-turn token), 'last_assistant', or 'all' tokens."""
    truncation: str = "keep_start"
    """Preference pairs, KTO and GRPO prompts (as TRL's truncation_mode): each prompt + completion is cut to
    seq_len + 1 tokens keeping its start ('keep_start', TRL's default: an example whose prompt alone fills the
    limit is dropped) or its end ('keep_end': the prompt loses its start, nothing is dropped)."""
    warn_dropped: float = 0.05
    """chat, completion, preference data: warn when more than this share of examples is dropped (no token left to
    train)."""
    max_examples: int | None = None
    """Use only the first N records of source, after a seeded shuffle (a quick subset)."""
    val_source: str | None = None
    """Validation data: a local file, or a split name of the hub data set source; None holds out val_fraction."""
    val_fraction: float = 0.05
    """Fraction of examples held out for validation when val_source is None (at least 1 if > 0)."""
    shuffle: bool = True
    """Shuffle the training order each epoch (seeded, so a run can resume mid-epoch)."""

    def __post_init__(self) -> None:
        if self.hub_config == "auto":
            self.hub_config = "long" if self.source == DEFAULT_SOURCE else None
        if self.task not in TASKS:
            raise ConfigError(f"unknown data task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_examples is not None and self.max_examples <= 0:
            raise ConfigError(f"max_examples must be None or > 0, got {self.max_examples}")
        for name, value, allowed in (("chat_format", self.chat_format, CHAT_FORMATS),
                                     ("train_on", self.train_on, TRAIN_ON),
                                     ("truncation", self.truncation, TRUNCATIONS)):
            if value not in allowed:
                raise ConfigError(f"unknown data.{name} {value!r}; choose one of {', '.join(allowed)}")
        if not isinstance(self.fields, dict) or not all(isinstance(v, str) and v for v in self.fields.values()):
            raise ConfigError(f"data.fields must map field names to record names, got {self.fields!r}")
        unknown = sorted(set(self.fields) - set(FIELD_NAMES))
        if unknown:
            raise ConfigError(f"data.fields: unknown field {unknown[0]!r}; known: {', '.join(FIELD_NAMES)}")
        check_template_variables(self.template_kwargs, "data.template_kwargs")
        if not 0.0 <= self.warn_dropped <= 1.0:
            raise ConfigError(f"data.warn_dropped must be in [0, 1], got {self.warn_dropped}")
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
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise ConfigError(f"{what} {template!r} must use named fields like {{documents}}, not {{{name}}}")
        if "." in name or "[" in name or conversion or spec:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(f"{what} {template!r}: {{{shown}}} is not a plain field name; a template may only name "
                              "record fields, like {documents} (no attribute access, indexing, '!' conversions or "
                              "':' format specs; write {{ and }} for literal braces)")
        fields.append(name)
    return fields

