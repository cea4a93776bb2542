"""Deterministic, resumable batches over a fixed list of examples (or of preference, KTO or GRPO items)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import ConfigError, DataError
from .examples import IGNORE_INDEX, Example


def permutation(n: int, seed: int) -> list[int]:
    """A seeded random order of range(n)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class Batches:
    """Deterministic, resumable batching over a fixed list of examples.

    ``examples`` are :class:`Example` s (SFT), or one kind of :mod:`~loratune.data.preference_items` items
    (pairs, KTO examples, GRPO prompts); each batch is collated by their type (:func:`collate`).

    Epoch e's order is a torch.randperm seeded from (seed, e), and ``batch(e, i)`` depends on
    nothing else, so resuming a run at a step needs only (epoch, index) and no sampler state.
    """

    def __init__(self, examples: list, batch_size: int, seed: int = 0, shuffle: bool = True,
                 *, pad_id: int, drop_last: bool = True) -> None:
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
            self._cached = (epoch, permutation(len(self.examples), mixed))
        return self._cached[1]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of epoch ``epoch``, collated by the items' type (see :func:`collate`)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches per epoch")
        start = index * self.batch_size
        return collate([self.examples[i] for i in self.order(epoch)[start:start + self.batch_size]], self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of epoch 0, in order (convenient for evaluation)."""
        return (self.batch(0, i) for i in range(len(self)))



def collate(items: list, pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of ``items``, all of one type: :class:`Example` s (:func:`collate_examples`), or the
    preference, KTO and GRPO items of :mod:`~loratune.data.preference_items`, each collated by its ``collate``."""
    kind = type(items[0])
    other = next((type(item) for item in items if type(item) is not kind), None)
    if other is not None:
        raise DataError(f"a batch mixes {kind.__name__} with {other.__name__}: batch one kind of data at a time")
    return collate_examples(items, pad_id) if kind is Example else kind.collate(items, pad_id)


def collate_examples(picked: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and labels (B, T), shifted and right-padded.

    Each example's ``input_ids[:-1]`` is read and ``labels[1:]`` predicted. Packed examples
    add ``position_ids`` (B, T), restarting at 0 where each packed example starts (padding: 0).
    """
    T = max(len(e.input_ids) for e in picked) - 1
    input_ids = torch.full((len(picked), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(picked), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    packed = any(e.segments is not None for e in picked)
    positions = torch.zeros((len(picked), T), dtype=torch.long) if packed else None  # (B, T)
    for row, e in enumerate(picked):
        n = len(e.input_ids) - 1
        input_ids[row, :n] = torch.tensor(e.input_ids[:-1], dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels[1:], dtype=torch.long)
        if positions is not None:
            segments = e.segments or [n + 1]
            positions[row, :n] = torch.cat([torch.arange(k) for k in segments])[:n]
    batch = {"input_ids": input_ids, "labels": labels}
    if positions is not None:
        batch["position_ids"] = positions
    return batch
