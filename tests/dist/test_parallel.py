"""loratune/dist/parallel.py and the data-parallel step, in one process: each rank's share of a batch, and the
arithmetic that makes N ranks' gradients the one-process gradient (the launches are in test_torchrun.py)."""

from __future__ import annotations

import torch

from loratune.data.examples import IGNORE_INDEX
from loratune.dist.parallel import decoder_blocks, run_on_model, shard_batch
from loratune.dist.world import World
from loratune.train.loss import CausalLMLoss, count_targets, lm_loss_sum
from loratune.train.step import evaluate, forward_backward


def _batch(rows: int, T: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (rows, T), generator=g)
    y = torch.randint(0, 50, (rows, T), generator=g)
    y[:, :2] = IGNORE_INDEX  # prompts
    return {"input_ids": x, "labels": y}


def test_shards_cover_the_batch_once_and_fillers_carry_no_targets():
    batch = _batch(7)
    shards = [shard_batch(batch, World(rank=r, size=3)) for r in range(3)]
    assert [s["input_ids"].shape[0] for s in shards] == [3, 3, 3]  # ceil(7 / 3) rows each
    real = torch.cat([shards[0]["input_ids"], shards[1]["input_ids"], shards[2]["input_ids"][:1]])
    assert torch.equal(real, batch["input_ids"])
    assert (shards[2]["labels"][1:] == IGNORE_INDEX).all()  # the two made-up rows
    assert sum(count_targets(s["labels"]) for s in shards) == count_targets(batch["labels"])


def test_one_rank_takes_the_whole_batch():
    batch = _batch(4)
    assert shard_batch(batch, World()) is batch


def test_ranks_gradients_average_to_the_one_process_gradient(model):
    """forward_backward on each rank's rows (scaled by the world size, as DDP/FSDP2 then average) gives,
    averaged over the ranks, the one-process gradient; the ranks' losses add up to its loss."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    batch = _batch(5, T=8, seed=1)
    autocast = torch.autocast("cpu", enabled=False)

    def grads(world: World) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss, _ = forward_backward(model, batch, 2, None, torch.device("cpu"), autocast, trainable, world)
        return loss, [p.grad.clone() for p in trainable]

    one_loss, one = grads(World())
    parts = [grads(World(rank=r, size=2)) for r in range(2)]
    assert abs(sum(loss for loss, _ in parts) - one_loss) < 1e-5
    for i, g in enumerate(one):
        torch.testing.assert_close((parts[0][1][i] + parts[1][1][i]) / 2, g, rtol=1e-5, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_loss_module_is_the_model_loss(model):
    batch = _batch(3, T=8)
    with torch.no_grad():
        expected = lm_loss_sum(model, batch["input_ids"], batch["labels"])
        assert torch.equal(CausalLMLoss(model)(batch["input_ids"], batch["labels"]), expected)
        assert run_on_model(CausalLMLoss(model), lambda m, k: m is model and k == 1, 1)


def test_evaluation_over_ranks_adds_up_to_one_process(model):
    class _Two:
        def __init__(self, batches):
            self.batches = batches

        def __len__(self):
            return len(self.batches)

        def batch(self, epoch, i):
            return self.batches[i]

    data = _Two([_batch(3, T=8, seed=2), _batch(1, T=8, seed=3)])
    autocast = torch.autocast("cpu", enabled=False)
    one = evaluate(model, data, torch.device("cpu"), autocast)
    sums = []
    for r in range(2):  # each rank's sums (World.sum is the identity without a process group)
        total = 0.0
        for i in range(len(data)):
            part = shard_batch(data.batch(0, i), World(rank=r, size=2))
            with torch.no_grad():
                total += float(lm_loss_sum(model, part["input_ids"], part["labels"]))
        sums.append(total)
    targets = sum(count_targets(b["labels"]) for b in data.batches)
    assert abs(sum(sums) / targets - one) < 1e-5


def test_the_blocks_are_the_longest_module_list(model):
    assert decoder_blocks(model) is model.transformer.h
