"""GRPO's reward functions: the recipe's ``grpo.rewards``, each a mapping with a ``type`` and an optional
``weight`` (default 1.0) and ``name`` (the metric's ``rewards/<name>/mean``; default: the type, or the
function's name).

Built-ins, each 1.0 or 0.0 per completion (the completion's text: decoded without special tokens, as
TRL decodes it):

- ``{type: exact, field: answer}``: the completion, stripped, equals the record's ``answer`` (stripped).
- ``{type: regex, field: answer, pattern: "The answer is (\\d+)"}``: the text ``pattern`` finds in the
  completion (its first group, or the whole match) equals the record's ``answer``; without ``pattern``
  the record's ``answer`` is itself the regex the completion must contain (references with several
  accepted forms).
- ``{type: length, min_words: 3, max_words: 12}``: the completion's word count (whitespace-separated)
  is inside the band (a binary band, not a graded score); either bound may be left out.
- ``{type: format, pattern: "^<think>.*</think>"}``: the completion matches the regex (``re.search``
  with DOTALL: anchor it with ``^``/``$`` to constrain the whole text).
- ``{type: function, function: "my_rewards:score"}``: a user function, importable by name
  (``module:function``, or ``path/to/file.py:function``), called as TRL calls reward functions:
  ``fn(prompts=[...], completions=[...], completion_ids=[...], **fields)`` where each record field
  (but prompt/completion/completion_ids) comes as a list aligned with the completions; it returns one
  float (or None: "does not apply to this completion") per completion.

What a user can get wrong is refused with the reward named: an unknown type, a missing field or
pattern, a regex that does not compile, a function that cannot be imported (ConfigError, when the
objective is set up); a function that raises (the record it failed on is found by calling it on one
completion at a time), returns the wrong number of rewards, NaN/Inf or something not a number, a
record without the field, or a completion that no reward function scores (DataError, naming the
record).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError

log = logging.getLogger("loratune")

REWARD_TYPES = ("exact", "regex", "length", "format", "function")
_KEYS = {"exact": {"field"}, "regex": {"field", "pattern"}, "length": {"min_words", "max_words"},
         "format": {"pattern"}, "function": {"function"}}
"""The keys each type reads besides type, weight and name."""

EXAMPLE = "grpo.rewards: [{type: exact, field: answer}] (or length, format, regex, function; see train/rewards.py)"


@dataclass
class Completions:
    """One rollout's completions, aligned: completion i answers prompt ``prompts[i]`` of ``records[i]``."""

    prompts: list[Any]
    """The prompt as the record holds it (text, or a conversation: a list of messages)."""
    texts: list[str]
    """The completions' text (special tokens skipped)."""
    ids: list[list[int]]
    """The completions' token ids (the stop token included, as TRL's completion_ids)."""
    records: list[dict[str, Any]]
    """Each completion's source record."""
    uids: list[int]
    """Each completion's item id (train 0..n-1, then validation), for messages."""
    state: Any = None
    """What TRL passes as ``trainer_state``: here ``global_step`` (the step being prepared; 0 in evaluation)."""

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, i: int) -> str:
        return f"record {self.uids[i]} (prompt {_short(self.prompts[i])})"


@dataclass
class Reward:
    """One reward function of the recipe, with its weight."""

    name: str
    weight: float
    score: Callable[[Completions], list[float | None]]
    """Rewards of every completion (None: does not apply)."""
    what: str
    """How messages name it: ``grpo.rewards[1] (function my_rewards:score)``."""


def build_rewards(specs: Sequence[dict[str, Any]]) -> list[Reward]:
    """The reward functions of ``grpo.rewards`` (ConfigError on anything malformed; none at all included)."""
    if not specs:
        raise ConfigError(f"objective grpo needs reward functions, and grpo.rewards is empty: write e.g. {EXAMPLE}")
    rewards = [_build(i, spec) for i, spec in enumerate(specs)]
    seen: dict[str, int] = {}
    for r in rewards:  # two rewards of one type get distinct metric names
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}_{seen[r.name]}"
    return rewards


def _build(i: int, spec: dict[str, Any]) -> Reward:
    where = f"grpo.rewards[{i}]"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping such as {{type: exact, field: answer}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in REWARD_TYPES:
        raise ConfigError(f"{where}: unknown reward type {kind!r}; choose one of {', '.join(REWARD_TYPES)}")
    unknown = set(spec) - _KEYS[kind] - {"type", "weight", "name"}
    if unknown:
        raise ConfigError(f"{where} ({kind}): unknown key(s) {', '.join(sorted(unknown))}; it reads "
                          f"{', '.join(sorted(_KEYS[kind] | {'weight', 'name'}))}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"{where} ({kind}): weight must be a finite number, got {weight!r}")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[\w.\-]+", name)):
        raise ConfigError(f"{where} ({kind}): name must be a word such as 'accuracy', got {name!r}")
    what = f"{where} ({kind})"
    if kind == "function":
        fn = import_function(spec.get("function"), where)
        what = f"{where} (function {spec['function']})"
        return Reward(name or fn.__name__, float(weight), _calling(fn, what), what)
    if kind in ("exact", "regex") and not (isinstance(spec.get("field"), str) and spec["field"]):
        raise ConfigError(f"{where} ({kind}): give the record field holding the reference, e.g. field: answer")
    pattern = spec.get("pattern")
    if kind == "format" and pattern is None:
        raise ConfigError(f"{where} (format): give the pattern the completion must match, e.g. pattern: '^<think>'")
    compiled = _compile(pattern, what) if pattern is not None else None
    if kind == "length":
        low, high = spec.get("min_words"), spec.get("max_words")
        for key, value in (("min_words", low), ("max_words", high)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{what}: {key} must be a non-negative integer, got {value!r}")
        if low is None and high is None:
            raise ConfigError(f"{what}: give min_words, max_words or both")
        if low is not None and high is not None and low > high:
            raise ConfigError(f"{what}: min_words {low} is above max_words {high}")
        one = _length(low, high)
    elif kind == "format":
        one = _format(compiled)
    elif kind == "exact":
        one = _exact(spec["field"], what)
    else:
        one = _regex(spec["field"], compiled, what)
    return Reward(name or kind, float(weight), _each(one), what)


def _compile(pattern: Any, what: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ConfigError(f"{what}: pattern must be a regex string, got {pattern!r}")
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ConfigError(f"{what}: the pattern {pattern!r} is not a valid regex: {exc}") from None


def import_function(ref: Any, where: str = "grpo.rewards") -> Callable:
    """The function ``module:function`` (or ``path/to/file.py:function``) names; ConfigError if it cannot
    be imported."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ConfigError(f"{where} (function): function must name it as 'module:function' or "
                          f"'path/to/file.py:function', got {ref!r}")
    module_name, attr = ref.split(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"{where} (function {ref}): no such file {path}")
            spec = importlib.util.spec_from_file_location(f"loratune_rewards_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001  (ImportError, or whatever the module raises as it is imported)
        hint = "" if module_name.endswith(".py") else (" (is its directory on PYTHONPATH? "
                                                        "or name the file: path/to/file.py:function)")
        raise ConfigError(f"{where} (function {ref}): cannot import {module_name}: {type(exc).__name__}: "
                          f"{exc}{hint}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where} (function {ref}): {module_name} has no function {attr!r}")
    return fn


# ---------------------------------------------------------------------------------------------- built-ins
def _field(record: dict[str, Any], field: str, what: str, batch: Completions, i: int) -> str:
    if field not in record or record[field] is None:
        raise DataError(f"{what}: {batch.where(i)} has no field {field!r} to compare with (its fields: "
                        f"{', '.join(sorted(record))})")
    return str(record[field])


def _exact(field: str, what: str):
    def one(batch: Completions, i: int) -> float:
        return float(batch.texts[i].strip() == _field(batch.records[i], field, what, batch, i).strip())
    return one


def _regex(field: str, pattern: re.Pattern | None, what: str):
    def one(batch: Completions, i: int) -> float:
        reference = _field(batch.records[i], field, what, batch, i)
        if pattern is None:  # the reference is the regex
            try:
                return float(re.search(reference, batch.texts[i], re.DOTALL) is not None)
            except re.error as exc:
                raise DataError(f"{what}: the {field!r} of {batch.where(i)}, {reference!r}, is not a valid regex "
                                f"({exc}): give a pattern to extract the answer with instead") from None
        found = pattern.search(batch.texts[i])
        if found is None:
            return 0.0
        answer = found.group(1) if pattern.groups and found.group(1) is not None else found.group(0)
        return float(answer.strip() == reference.strip())
    return one


def _length(low: int | None, high: int | None):
    def one(batch: Completions, i: int) -> float:
        n = len(batch.texts[i].split())
        return float((low is None or n >= low) and (high is None or n <= high))
    return one


def _format(pattern: re.Pattern):
    def one(batch: Completions, i: int) -> float:
        return float(pattern.search(batch.texts[i]) is not None)
    return one


def _each(one) -> Callable[[Completions], list[float | None]]:
    return lambda batch: [one(batch, i) for i in range(len(batch))]


# ---------------------------------------------------------------------------------------------- user functions
def _trl_kwargs(batch: Completions, rows: Sequence[int]) -> dict[str, Any]:
    """TRL's reward arguments for completions ``rows``: prompts, completions (text, or an assistant message
    for conversational prompts), completion_ids, and every record field as a list."""
    conversational = isinstance(batch.prompts[0], list)
    completions = [[{"role": "assistant", "content": batch.texts[i]}] if conversational else batch.texts[i]
                   for i in rows]
    keys = dict.fromkeys(k for i in rows for k in batch.records[i] if k not in ("prompt", "completion",
                                                                                   "completion_ids"))
    fields = {k: [batch.records[i].get(k) for i in rows] for k in keys}
    return dict(prompts=[batch.prompts[i] for i in rows], completions=completions,
                completion_ids=[batch.ids[i] for i in rows], trainer_state=batch.state, log_extra=_ignore,
                log_metric=_ignore, **fields)


def _ignore(*args, **kwargs) -> None:
    """TRL's ``log_extra`` / ``log_metric`` callbacks, accepted and not logged."""


def _calling(fn: Callable, what: str) -> Callable[[Completions], list[float | None]]:
    def score(batch: Completions) -> list[float | None]:
        try:
            out = fn(**_trl_kwargs(batch, range(len(batch))))
        except Exception as exc:
            raise DataError(f"{what} raised {type(exc).__name__}: {exc} {_failing(fn, batch)}") from exc
        try:
            out = list(out)
        except TypeError:
            raise DataError(f"{what} returned {type(out).__name__}, not a list of {len(batch)} floats (one per "
                            "completion)") from None
        if len(out) != len(batch):
            raise DataError(f"{what} returned {len(out)} rewards for {len(batch)} completions: it must return one "
                            "per completion (None where it does not apply)")
        return out
    return score


def _failing(fn: Callable, batch: Completions) -> str:
    """Which record the function fails on, found by calling it on one completion at a time."""
    for i in range(len(batch)):
        try:
            fn(**_trl_kwargs(batch, [i]))
        except Exception:  # noqa: BLE001  (as above)
            return f"on {batch.where(i)}, completion {_short(batch.texts[i])}"
    return f"on the batch of records {', '.join(map(str, dict.fromkeys(batch.uids)))}"


# ---------------------------------------------------------------------------------------------- scoring
def score_completions(rewards: Sequence[Reward], batch: Completions) -> torch.Tensor:
    """(N, F) float32: reward function f's value for completion n, NaN where it returned None (TRL's
    ``rewards_per_func``). DataError on a value that is not a finite number, or a completion no function
    scores."""
    table = torch.full((len(batch), len(rewards)), math.nan, dtype=torch.float32)
    for f, reward in enumerate(rewards):
        for i, value in enumerate(reward.score(batch)):
            if value is None:
                continue
            number = _number(value)
            if number is None or not math.isfinite(number):
                raise DataError(f"{reward.what} returned {value!r} for {batch.where(i)}: a reward must be a finite "
                                "number (or None where the function does not apply)")
            table[i, f] = number
    unscored = torch.isnan(table).all(dim=1)
    if bool(unscored.any()):  # TRL's: such a completion gets advantage 0 (grpo.group_advantages), and a warning
        i = int(unscored.nonzero()[0, 0])
        log.warning(f"{int(unscored.sum())} of {len(batch)} completions were scored by no reward function (every one "
                    f"of {', '.join(r.what for r in rewards)} returned None), e.g. {_short(batch.texts[i])} of "
                    f"{batch.where(i)}: their advantage is 0")
    return table


def _number(value: Any) -> float | None:
    """A reward as a float, as TRL's ``torch.tensor(values)`` reads it: a Python or numpy number or bool (0/1),
    a one-element tensor or array; None for anything else."""
    if isinstance(value, numbers.Real):  # int, float, bool, numpy's scalars
        return float(value)
    if (isinstance(value, torch.Tensor) and value.numel() == 1) or getattr(value, "size", None) == 1:
        try:
            return float(value.item())
        except (AttributeError, TypeError, ValueError):
            return None
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

