"""Sequence packing: documents joined into one token stream, or whole examples sharing rows.

Not to be confused with :mod:`loratune.generate.cpu_prepack` (weight layouts for CPU decoding).
"""

from __future__ import annotations

import bisect

from .examples import Example


def pack_documents(docs: list[list[int]], seq_len: int) -> list[list[int]]:
    """Blocks of ``seq_len + 1`` tokens at stride ``seq_len`` over the concatenated ``docs``.

    Each block gives ``seq_len`` (input, next-token) pairs; consecutive blocks share one token, so
    every token of the stream is a target once. The last partial block is dropped. Documents should
    end with the end-of-text token so that the model sees where one stops and the next begins, and
    start with the tokenizer's BOS where it has one (see :func:`loratune.data.tasks.encode_records`).
    Documents attend across their boundaries here (pretraining-style); :func:`pack_examples` does not.
    """
    stream = [tok for doc in docs for tok in doc]
    return [stream[start:start + seq_len + 1] for start in range(0, len(stream) - seq_len, seq_len)]


def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Whole examples packed into rows of at most ``seq_len + 1`` tokens, best fit, longest first.

    A row keeps each example's ``segments`` length, so the batch restarts positions at each
    example and attention stays block-diagonal (no example sees another): each example's loss is
    what it is alone. Each example's first label is -100 already, so no token is predicted across
    a boundary. Deterministic: the same examples give the same rows.
    """
    capacity = seq_len + 1
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))  # stable: ties keep order
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted: the best fit is the first with enough room
    for i in order:
        n = len(examples[i].input_ids)
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            left, row = capacity - n, len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(i)
            left -= n
        if left > 1:  # a row with one token left takes no example (each has at least two)
            bisect.insort(room, (left, row))
    packed = []
    for row in rows:
        picked = [examples[i] for i in row]
        packed.append(Example([t for e in picked for t in e.input_ids], [t for e in picked for t in e.labels],
                              segments=[len(e.input_ids) for e in picked]))
    return packed
