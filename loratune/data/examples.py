"""A training example: token ids and their labels, aligned as in transformers."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
"""The label of a token that is not trained (PyTorch's cross-entropy ignore_index)."""


@dataclass
class Example:
    """Token ids and labels of equal length, as transformers aligns them.

    ``labels[i]`` is ``input_ids[i]`` where that token is trained and -100 where it is not; the
    shift happens in the batch (the model reads ``input_ids[:-1]`` and predicts ``labels[1:]``), so a
    sequence of seq_len + 1 tokens gives seq_len predictions. ``labels[0]`` is always -100: nothing
    predicts the first token. ``segments`` are the lengths of the examples packed into this row, in
    order (None: one sequence); each restarts its positions and attends only to itself.
    """

    input_ids: list[int]
    labels: list[int]
    segments: list[int] | None = None

    @property
    def trained(self) -> int:
        """How many tokens this example trains."""
        return sum(1 for lab in self.labels if lab != IGNORE_INDEX)


@dataclass
class Encoded:
    """One record as the model sees it: its example (None when dropped) and what happened to it."""

    example: Example | None
    cut: str | None = None
    """What truncation removed, e.g. 'cut the last 2 of 6 messages to fit 129 tokens'."""
    cut_inside: bool = False
    """True when text was cut inside a turn or document, not only whole turns dropped."""
    dropped: str | None = None
    """Why the record gives no example (nothing left to train), when it gives none."""
