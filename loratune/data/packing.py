"""Sequence packing: documents joined into one token stream and cut into full blocks.

Not to be confused with :mod:`loratune.generate.cpu_prepack` (weight layouts for CPU decoding).
"""

from __future__ import annotations


def pack_documents(docs: list[list[int]], seq_len: int) -> list[list[int]]:
    """Blocks of ``seq_len + 1`` tokens at stride ``seq_len`` over the concatenated ``docs``.

    Each block gives ``seq_len`` (input, next-token) pairs; consecutive blocks share one token, so
    every token of the stream is a target once. The last partial block is dropped. Documents should
    end with the end-of-text token so that the model sees where one stops and the next begins, and
    start with the tokenizer's BOS where it has one (see :func:`loratune.data.tasks.build_examples`).
    """
    stream = [tok for doc in docs for tok in doc]
    return [stream[start:start + seq_len + 1] for start in range(0, len(stream) - seq_len, seq_len)]
