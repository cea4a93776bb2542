"""Whole-example packing: every example once, whole, in rows of at most seq_len + 1 tokens, and the
batch's position ids restart at each example."""

from __future__ import annotations

import torch

from loratune.data.batches import Batches
from loratune.data.examples import IGNORE_INDEX, Example
from loratune.data.packing import pack_examples


def _examples(lengths: list[int]) -> list[Example]:
    return [Example([i] * n, [IGNORE_INDEX] + [i] * (n - 1)) for i, n in enumerate(lengths)]


def test_rows_hold_every_example_once_and_whole():
    lengths = [5, 17, 3, 9, 9, 2, 16, 8, 11, 4, 7, 13]
    examples = _examples(lengths)
    rows = pack_examples(examples, seq_len=16)
    assert all(len(r.input_ids) == len(r.labels) == sum(r.segments) <= 17 for r in rows)
    seen = []
    for row in rows:
        offset = 0
        for n in row.segments:
            part = row.input_ids[offset:offset + n]
            assert len(set(part)) == 1 and lengths[part[0]] == n  # one whole example
            assert row.labels[offset] == IGNORE_INDEX  # nothing is predicted across a boundary
            seen.append(part[0])
            offset += n
    assert sorted(seen) == list(range(len(lengths)))
    assert len(rows) == -(-sum(lengths) // 17)  # best fit reaches the lower bound on this set
    assert pack_examples(examples, seq_len=16) == rows  # deterministic


def test_position_ids_restart_at_each_example_and_padding_is_zero():
    rows = [Example([1, 2, 3, 4, 5], [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5], segments=[3, 2]),
            Example([6, 7, 8], [IGNORE_INDEX, 7, 8], segments=[3])]
    batch = Batches(rows, 2, shuffle=False, pad_id=0).batch(0, 0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, IGNORE_INDEX, 5], [7, 8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
    assert batch["position_ids"].dtype == torch.long
