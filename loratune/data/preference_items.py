"""Preference pairs, KTO examples and GRPO prompts as token ids, cut and batched as TRL 1.16 does.

Tokenizing (TRL's ``DPOTrainer._prepare_dataset`` / ``KTOTrainer._prepare_dataset`` ``tokenize_fn``,
and ``GRPOTrainer._tokenize_prompts``): a text completion gets the EOS text appended unless it ends
with it; then ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are tokenized as transformers'
``tokenizer(text)`` does (BOS included where the tokenizer puts one). A conversation is rendered by the
model's chat template (``data.chat_template`` / ``data.template_kwargs`` choose and tune it): the prompt
with the generation prompt, prompt + chosen and prompt + rejected each as a whole conversation, the
text tokenized without added special tokens. The prompt is the tokens the prompt shares with *both*
prompt + completion sequences (TRL's ``common_prefix_length``: a template may render the prompt alone
differently), and each completion is the rest of its sequence. The ids are TRL's ``prompt_ids``,
``chosen_ids``, ``rejected_ids`` (``completion_ids`` for KTO) for the same tokenizer.

Truncation (TRL's collators, ``max_length = seq_len + 1``): each sequence (prompt + completion) is cut
to ``seq_len + 1`` tokens, keeping its start (``data.truncation: keep_start``, TRL's default) or its end
(``keep_end``). With ``keep_start``, an example whose prompt alone has ``seq_len + 1`` tokens or more is
dropped (it would train no token), counted, and warned about past ``data.warn_dropped``; ``keep_end``
drops nothing. A GRPO prompt follows the same rule (dropped, or kept to its last ``seq_len`` tokens).

Batches follow loratune's SFT convention (``input_ids = seq[:-1]``, ``labels = seq[1:]``, -100 on the
prompt and on right padding), rows along dim 0 (see :meth:`PairItem.collate`, :meth:`UnpairedItem.collate`,
:meth:`PromptItem.collate`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import DataError
from .chat_template import ChatTemplate, resolve_chat_template
from .config import DataConfig
from .examples import IGNORE_INDEX, Example
from .preference_formats import (
    Content,
    Pair,
    Unpaired,
    read_pairs,
    read_prompts,
    read_unpaired,
)
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

ITEM_KINDS = ("pairs", "unpaired", "prompts")
"""The data kinds this module builds (sft is :mod:`~loratune.data.tasks`)."""


def cut_row(prompt_ids: Sequence[int], completion_ids: Sequence[int], limit: int, truncation: str) -> Example:
    """prompt + completion as one example of at most ``limit`` tokens, labels -100 on the prompt.

    ``keep_start`` keeps the first ``limit`` tokens, ``keep_end`` the last (TRL's collators); the first
    token's label is -100 either way (nothing predicts it, as TRL's shifted completion mask has it).
    """
    ids = [*prompt_ids, *completion_ids]
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)
    if len(ids) > limit:
        keep = slice(None, limit) if truncation == "keep_start" else slice(len(ids) - limit, None)
        ids, labels = ids[keep], labels[keep]
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(ids, labels)


def _fits(prompt_ids: Sequence[int], limit: int, truncation: str) -> bool:
    """False for an example TRL drops: with keep_start, a prompt that alone fills the limit."""
    return truncation != "keep_start" or len(prompt_ids) < limit


def _pad_rows(rows: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (N, T): every row shifted (reads ``ids[:-1]``, predicts ``labels[1:]``) and
    right-padded (pad_id, -100) to the longest."""
    T = max(max(len(r.input_ids) for r in rows) - 1, 1)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (N, T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    for n, r in enumerate(rows):
        k = len(r.input_ids) - 1
        if k > 0:
            input_ids[n, :k] = torch.tensor(r.input_ids[:-1], dtype=torch.long)
            labels[n, :k] = torch.tensor(r.labels[1:], dtype=torch.long)
    return input_ids, labels


def _with_ref_logps(batch: dict[str, torch.Tensor], items: Sequence[Any]) -> dict[str, torch.Tensor]:
    """``batch`` with ``ref_logps`` (B, 2) float32: the items' precomputed reference log-probs, when they carry
    them."""
    have = [item.ref_logps is not None for item in items]
    if not any(have):
        return batch
    if not all(have):
        raise RuntimeError("some items of a batch carry ref_logps and others do not: precompute them for all")
    return {**batch, "ref_logps": torch.tensor([list(item.ref_logps) for item in items], dtype=torch.float32)}


@dataclass
class PairItem:
    """One preference pair: TRL's ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and how to cut them."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    limit: int
    """The longest sequence: seq_len + 1."""
    truncation: str = "keep_start"
    where: str = ""
    """Where the record is ('data.jsonl, line 3'), for messages."""
    ref_logps: tuple[float, float] | None = None
    """The reference's summed log-probs of (chosen, rejected), set by an objective that precomputes them."""
    kind: ClassVar[str] = "pairs"

    @property
    def fits(self) -> bool:
        """False where the prompt alone fills the limit under keep_start (TRL drops it)."""
        return _fits(self.prompt_ids, self.limit, self.truncation)

    def rows(self) -> tuple[Example, Example]:
        """(prompt + chosen, prompt + rejected), each cut to the limit."""
        return (cut_row(self.prompt_ids, self.chosen_ids, self.limit, self.truncation),
                cut_row(self.prompt_ids, self.rejected_ids, self.limit, self.truncation))

    @staticmethod
    def collate(items: Sequence[PairItem], pad_id: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` (B, 2, T): ``[:, 0]`` prompt + chosen, ``[:, 1]`` prompt + rejected, T the
        longest of both in the batch; ``ref_logps`` (B, 2) float32 when the items carry them."""
        input_ids, labels = _pad_rows([r for item in items for r in item.rows()], pad_id)  # (2B, T)
        batch = {"input_ids": input_ids.view(len(items), 2, -1), "labels": labels.view(len(items), 2, -1)}
        return _with_ref_logps(batch, items)


@dataclass
class UnpairedItem:
    """One KTO example: TRL's ``prompt_ids``, ``completion_ids``, its label, and how to cut them."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    limit: int
    truncation: str = "keep_start"
    where: str = ""
    ref_logps: tuple[float, float] | None = None
    """The reference's summed log-probs of (the completion, the KL row), set by an objective that
    precomputes them (the KL row depends on the batch: see :meth:`collate`)."""
    kind: ClassVar[str] = "unpaired"

    @property
    def fits(self) -> bool:
        return _fits(self.prompt_ids, self.limit, self.truncation)

    def row(self) -> Example:
        return cut_row(self.prompt_ids, self.completion_ids, self.limit, self.truncation)

    @staticmethod
    def collate(items: Sequence[UnpairedItem], pad_id: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` (B, 2, T): ``[:, 0]`` prompt + completion; ``[:, 1]`` the KL row;
        ``desirable`` (B,) bool; ``ref_logps`` (B, 2) when the items carry them.

        The KL row is TRL's (``KTOTrainer._prepare_dataset``, ``add_kl_completion_ids``): the batch's
        completions rotated by one, row i = prompt i + completion i - 1, row 0 taking the last row's
        completion ((x1, y1) ... (xn, yn) -> (x1, yn), (x2, y1) ... (xn, yn-1)), cut like any sequence.
        TRL rotates within each chunk of ``per_device_train_batch_size`` of a sequentially read data set;
        here within the batch as it is drawn, so a batch of the same rows in the same order gets the same
        KL rows. A batch of one pairs its completion with its own prompt.
        """
        rows = [item.row() for item in items]
        completions = [items[i - 1].completion_ids for i in range(len(items))]  # items[-1] for row 0
        kl = [cut_row(item.prompt_ids, c, item.limit, item.truncation) for item, c in zip(items, completions)]
        input_ids, labels = _pad_rows(rows + kl, pad_id)  # (2B, T)
        B = len(items)
        batch = {"input_ids": torch.stack([input_ids[:B], input_ids[B:]], dim=1),  # (B, 2, T)
                 "labels": torch.stack([labels[:B], labels[B:]], dim=1),
                 "desirable": torch.tensor([item.desirable for item in items], dtype=torch.bool)}
        return _with_ref_logps(batch, items)


@dataclass
class PromptItem:
    """One GRPO prompt: its ids, a unique id over train + validation, and the record it came from."""

    prompt_ids: list[int]
    record: dict[str, Any]
    """The whole source record: reward functions read its reference fields (an answer ...)."""
    limit: int
    truncation: str = "keep_start"
    where: str = ""
    uid: int = -1
    """Train items 0..n-1, validation items n..n+m-1 (set by :func:`~loratune.data.prepare.prepare_data`)."""
    cut: int = 0
    """Tokens keep_end removed from the prompt's start."""
    kind: ClassVar[str] = "prompts"

    @property
    def fits(self) -> bool:
        return _fits(self.prompt_ids, self.limit, self.truncation)

    @staticmethod
    def collate(items: Sequence[PromptItem], pad_id: int) -> dict[str, torch.Tensor]:
        """``input_ids`` (B, P) the prompts right-padded with pad_id, ``prompt_lens`` (B,), ``uid`` (B,)."""
        P = max(len(item.prompt_ids) for item in items)
        input_ids = torch.full((len(items), P), pad_id, dtype=torch.long)  # (B, P)
        for row, item in enumerate(items):
            input_ids[row, :len(item.prompt_ids)] = torch.tensor(item.prompt_ids, dtype=torch.long)
        return {"input_ids": input_ids,
                "prompt_lens": torch.tensor([len(item.prompt_ids) for item in items], dtype=torch.long),
                "uid": torch.tensor([item.uid for item in items], dtype=torch.long)}


Item = PairItem | UnpairedItem | PromptItem


@dataclass
class _Encoder:
    """Texts and conversations -> ids, as TRL's ``_tokenize`` gets them from a transformers tokenizer."""

    tokenizer: Tokenizer
    cfg: DataConfig
    _template: ChatTemplate | None = field(default=None, repr=False)

    @property
    def eos_text(self) -> str:
        return self.tokenizer.backend.id_to_token(self.tokenizer.eos_id)

    def with_eos(self, completion: str) -> str:
        """TRL's add_eos: a text completion ends with the EOS text."""
        return completion if completion.endswith(self.eos_text) else completion + self.eos_text

    def render(self, messages: list[dict[str, Any]], where: str, kwargs: dict[str, Any],
               generation_prompt: bool = False) -> str:
        if self._template is None:
            tok = self.tokenizer
            text = resolve_chat_template(self.cfg.chat_template, tok.chat_template, tok.source)
            self._template = ChatTemplate(text, tok.special_texts, **self.cfg.template_kwargs)
        try:
            return self._template.render(messages, add_generation_prompt=generation_prompt, **kwargs)[0]
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None

    def sequences(self, prompt: Content, completions: list[Content], where: str,
                  kwargs: dict[str, Any]) -> tuple[str, list[str], bool]:
        """(prompt text, [prompt + completion texts], add_special): what TRL tokenizes."""
        if isinstance(prompt, str):
            return prompt, [prompt + self.with_eos(c) for c in completions], True
        return (self.render(prompt, where, kwargs, generation_prompt=True),
                [self.render(prompt + c, where, kwargs) for c in completions], False)

    def encode(self, texts: list[tuple[str, bool]]) -> list[list[int]]:
        """Each (text, add_special) as ids, the texts of each kind encoded in one batch."""
        out: list[list[int]] = [[] for _ in texts]
        for special in (True, False):
            at = [i for i, (_, s) in enumerate(texts) if s == special]
            for i, ids in zip(at, self.tokenizer.encode_batch([texts[i][0] for i in at], add_special=special)):
                out[i] = ids
        return out


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """How many leading tokens two sequences share (TRL's rule for where a completion starts)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def encode_items(records: list[dict], kind: str, cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                 source: str, prompt_field: str = "prompt") -> list[Item]:
    """Every record of ``kind`` ('pairs', 'unpaired', 'prompts') as an item, those that do not fit
    included (``item.fits`` False; :func:`build_items` drops them). A KTO data set of pairs gives two
    items a record. Errors name the record (see :mod:`~loratune.data.preference_formats`)."""
    if kind not in ITEM_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; one of {', '.join(ITEM_KINDS)}")
    encoder, limit, mode = _Encoder(tokenizer, cfg), seq_len + 1, cfg.truncation
    if kind == "prompts":
        prompts = read_prompts(records, prompt_field, source)
        texts = [(encoder.render(p.prompt, p.where, p.template_kwargs, generation_prompt=True), False)
                 if p.conversational else (p.prompt, True) for p in prompts]
        items = []
        for p, ids in zip(prompts, encoder.encode(texts)):
            cut = max(len(ids) - seq_len, 0) if mode == "keep_end" else 0
            items.append(PromptItem(ids[cut:], p.record, limit, mode, p.where, cut=cut))
        return items
    parsed: list[Pair] | list[Unpaired] = read_pairs(records, source) if kind == "pairs" else \
        read_unpaired(records, source)
    texts, shapes = [], []
    for r in parsed:
        answers = [r.chosen, r.rejected] if isinstance(r, Pair) else [r.completion]
        prompt, full, special = encoder.sequences(r.prompt, answers, r.where, r.template_kwargs)
        texts += [(prompt, special)] + [(t, special) for t in full]
        shapes.append(len(full))
    ids, at, items, moved = encoder.encode(texts), 0, [], 0
    for r, n in zip(parsed, shapes):
        prompt_ids, full = ids[at], ids[at + 1:at + 1 + n]
        at += 1 + n
        start = min(common_prefix_length(prompt_ids, f) for f in full)
        moved += start < len(prompt_ids)
        rests = [f[start:] for f in full]
        if isinstance(r, Pair):
            items.append(PairItem(prompt_ids[:start], rests[0], rests[1], limit, mode, r.where))
        else:
            items.append(UnpairedItem(prompt_ids[:start], rests[0], r.desirable, limit, mode, r.where))
    if moved:
        log.warning("%s: in %d of %d examples the tokenized prompt is not a prefix of the tokenized prompt + "
                    "completion (the chat template renders the prompt alone differently, or tokens merge across the "
                    "boundary); as TRL does, the completion starts where they diverge", source, moved, len(items))
    return items


def build_items(records: list[dict], kind: str, cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                source: str | None = None, prompt_field: str = "prompt") -> list[Item]:
    """The items of ``kind`` a run trains on: :func:`encode_items` without those that do not fit.

    Drops (keep_start: the prompt alone fills seq_len + 1 tokens) are counted and warned about past
    ``cfg.warn_dropped``; cut sequences are logged; no item left is a DataError saying why.
    """
    source = source or cfg.source
    if not records:
        raise DataError(f"the data is empty: no records from {source}")
    items = encode_items(records, kind, cfg, tokenizer, seq_len, source, prompt_field)
    kept = [item for item in items if item.fits]
    dropped, what = len(items) - len(kept), {"pairs": "pairs", "unpaired": "examples", "prompts": "prompts"}[kind]
    why = f"the prompt alone has {seq_len + 1} tokens or more (seq_len + 1; data.truncation keep_start)"
    if not kept:
        raise DataError(f"the data is empty: none of the {len(items)} {what} of {source} fits: {why}; raise seq_len, "
                        "shorten the prompts, or set data.truncation: keep_end")
    if dropped and dropped / len(items) > cfg.warn_dropped:
        log.warning("%s: %d of %d %s (%.0f%%) were dropped: %s", source, dropped, len(items), what,
                    100 * dropped / len(items), why)
    cut = sum(_is_cut(item) for item in kept)
    if cut:
        log.info("%s: %d of %d %s were cut to %d tokens (%s)", source, cut, len(kept), what, seq_len + 1,
                 cfg.truncation)
    return kept


def _is_cut(item: Item) -> bool:
    if isinstance(item, PromptItem):
        return item.cut > 0
    answers = [item.chosen_ids, item.rejected_ids] if isinstance(item, PairItem) else [item.completion_ids]
    return any(len(item.prompt_ids) + len(a) > item.limit for a in answers)
