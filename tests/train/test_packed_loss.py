"""Packed rows train exactly as the examples alone: per-example losses (<= 1e-5, fp32) and gradients
agree, on GPT-2 and on decoders with sliding windows and soft-capped logits, on both attention paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.data.batches import Batches
from loratune.data.examples import IGNORE_INDEX, Example
from loratune.data.packing import pack_examples
from loratune.models import load_model
from tests.family_models import BASE, write_decoder


def _examples(vocab: int, seed: int = 0) -> list[Example]:
    """Examples of 3-40 tokens with a trained tail, some trained everywhere after the first token."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(9):
        n = int(torch.randint(3, 41, (1,), generator=gen))
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        start = 1 if i % 3 == 0 else n // 2  # a prompt masked, or everything after the first token trained
        examples.append(Example(ids, [IGNORE_INDEX] * start + ids[start:]))
    return examples


def _per_position_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) cross-entropy of each target (0 where the label is -100)."""
    hidden = model.hidden_states(batch["input_ids"], position_ids=batch.get("position_ids"))
    logits = model.logits(hidden).float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")
    return loss.view(batch["labels"].shape)


def _per_example_losses(model, rows: list[Example]) -> list[float]:
    batch = Batches(rows, len(rows), shuffle=False, pad_id=0).batch(0, 0)
    losses = _per_position_loss(model, batch)
    out = []
    for r, row in enumerate(rows):
        offset = 0
        for n in row.segments or [len(row.input_ids)]:
            out.append(losses[r, offset:offset + n - 1].sum())  # the example's n - 1 predictions
            offset += n
    return out


@pytest.fixture(scope="module", params=["gpt2", "qwen3", "gemma3", "mistral"])
def model(request, tmp_path_factory):
    if request.param == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=BASE["vocab_size"]))
        path = tmp_path_factory.mktemp("gpt2")
        hf.save_pretrained(path)
    else:
        path = write_decoder(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(path, dtype=torch.float32)[0]


@pytest.mark.parametrize("grad", [True, False], ids=["matmul-attention", "sdpa-mask"])
def test_packed_rows_give_each_examples_own_loss(model, grad):
    examples = _examples(BASE["vocab_size"])
    rows = pack_examples(examples, seq_len=63)
    assert len(rows) < len(examples) and any(len(r.segments) > 2 for r in rows)
    with torch.set_grad_enabled(grad):
        packed = torch.stack(_per_example_losses(model, rows))
        alone = torch.stack([loss for e in examples for loss in _per_example_losses(model, [e])])
    order = [id(e) for e in examples]
    # rows hold the examples longest first: put the packed losses back in the examples' order
    placed = [(len(e.input_ids), e.input_ids) for r in rows for e in _split(r)]
    index = [placed.index((len(e.input_ids), e.input_ids)) for e in examples]
    assert len(set(index)) == len(order)
    torch.testing.assert_close(packed[index], alone, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_the_examples_alone(model):
    examples = _examples(BASE["vocab_size"], seed=1)
    rows = pack_examples(examples, seq_len=63)
    params = [p for p in model.parameters()]

    def grads(batches: list[list[Example]]) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        total = sum(torch.stack(_per_example_losses(model, b)).sum() for b in batches)
        total.backward()
        return [p.grad.clone() for p in params]

    packed = grads([rows])
    alone = grads([[e] for e in examples])
    for g_packed, g_alone in zip(packed, alone):
        # float32 sums in another order: agreement to 1e-5 of the largest gradient entry
        torch.testing.assert_close(g_packed, g_alone, rtol=1e-4, atol=1e-5 * float(g_alone.abs().max()))
    model.zero_grad(set_to_none=True)


def test_a_packed_row_differs_from_the_same_tokens_unpacked(model):
    """The check can fail: without position ids the same row attends across examples and its loss changes."""
    rows = [r for r in pack_examples(_examples(BASE["vocab_size"]), seq_len=63) if len(r.segments) > 1]
    batch = Batches(rows[:1], 1, shuffle=False, pad_id=0).batch(0, 0)
    with torch.no_grad():
        packed = _per_position_loss(model, batch).sum()
        crossed = _per_position_loss(model, {k: v for k, v in batch.items() if k != "position_ids"}).sum()
    assert abs(float(packed - crossed)) > 1e-3


def _split(row: Example) -> list[Example]:
    out, offset = [], 0
    for n in row.segments:
        out.append(Example(row.input_ids[offset:offset + n], row.labels[offset:offset + n]))
        offset += n
    return out
