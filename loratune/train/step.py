"""The one training step, used by the loop, ``compare`` and the benchmark alike, and evaluation.

:func:`train_step` is forward and backward over the step's micro-batches (the loss
token-weighted over the whole batch), the gradient norm and clipping, the non-finite check,
AdamW and the schedule. Nothing else in loratune updates weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..dist.parallel import grad_sync, shard_batch, shard_rows
from ..dist.world import SINGLE, World
from ..errors import LoratuneError
from ..runtime.finite import first_non_finite, local_part
from .loss import count_targets, lm_loss_sum


class TrainingStopped(LoratuneError):
    """The run stopped early (NaN loss); the message names the step and the last good checkpoint."""


class NonFiniteStep(TrainingStopped):
    """A step's loss, gradient norm or updated weights were NaN or Inf.

    For the loss and the gradient norm (``what``) nothing was updated; for ``"weights"`` the update
    has already been applied, so the model must not be saved or used any further.
    """

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"{what} became {value}")
        self.what, self.value = what, value


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step saw."""

    loss: float
    """The objective's loss: for sft the mean cross-entropy over the step's target tokens."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Token positions the step ran through the model with gradients (padding included), for throughput: the
    batch's, or what an objective prepared from it (a pair's two rows, GRPO's prompts with their completions)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """What the objective measured, averaged over the step (e.g. DPO's ``rewards/margins``); empty for sft."""


def loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """Summed loss of a batch through ``model``: one of ours (causal-LM cross-entropy), or an objective's
    module (:class:`~loratune.train.objective.Objective`; under DDP/FSDP2 the wrapped one), called by
    keyword so that their hooks run."""
    if hasattr(model, "hidden_states"):
        return lm_loss_sum(model, x, y, p)
    return model(input_ids=x, labels=y) if p is None else model(input_ids=x, labels=y, position_ids=p)


def _weight(objective, batch: dict[str, torch.Tensor]) -> int:
    return count_targets(batch["labels"]) if objective is None else objective.weight(batch)


def forward_backward(model: nn.Module, batch: dict[str, torch.Tensor], micro_batch: int, max_grad_norm: float | None,
                     device: torch.device, autocast, trainable: list[nn.Parameter],
                     world: World = SINGLE, objective=None, bare: nn.Module | None = None,
                     step: int = 0) -> tuple[float, float]:
    """Gradients of one optimizer step's batch, in micro-batches of ``micro_batch`` rows, then clipped.

    The loss is token-weighted over the whole batch (each micro-batch's summed loss is divided by
    the batch's target count), so the split changes memory, not the result. Returns the step's
    loss and the gradient norm before clipping; the norm is taken even without clipping
    (max_norm inf), so an Inf gradient is seen.

    In a launched run ``batch`` is the global batch: this rank takes its rows (``shard_batch``),
    divides by the global target count and scales by the world size (DDP and FSDP2 average over
    ranks), and gradients are all-reduced on the last micro-batch only; the loss is summed over ranks.
    ``objective`` (None: causal-LM cross-entropy) says what the summed loss is divided by; one that
    does not train on causal-LM batches (``lm_batches`` False) gets this rank's rows through its
    ``prepare`` (``bare``: the model without the DDP/FSDP2 wrapper, ``step``: the step about to run) and
    its module is called with every tensor of the batch (see :func:`_objective_losses`).
    """
    if objective is not None and not objective.lm_batches:
        loss_total = _objective_losses(model, batch, micro_batch, device, autocast, world, objective, bare, step)
        return loss_total, _clip(trainable, max_grad_norm)
    n_targets = max(1, _weight(objective, batch))
    batch = shard_batch(batch, world)
    x_all, y_all = batch["input_ids"].to(device), batch["labels"].to(device)
    p_all = batch.get("position_ids")  # packed rows
    x_parts, y_parts = x_all.split(micro_batch), y_all.split(micro_batch)
    p_parts = p_all.to(device).split(micro_batch) if p_all is not None else [None] * len(x_parts)
    loss_total = _backward(model, list(zip(x_parts, y_parts, p_parts)), lambda part: loss_sum(model, *part),
                           n_targets, autocast, world)
    return loss_total, _clip(trainable, max_grad_norm)


def _backward(model: nn.Module, parts: list, loss_of, n: float, autocast, world: World) -> float:
    """Backward of ``loss_of(part) / n`` for each micro-batch, gradients all-reduced with the last (scaled by the
    world size: DDP and FSDP2 average over ranks); returns the loss summed over parts and ranks."""
    loss_total = 0.0
    for i, part in enumerate(parts):
        with grad_sync(model, i == len(parts) - 1):
            with autocast:
                loss = loss_of(part) / n
            (loss * world.size if world.size > 1 else loss).backward()
        loss_total += float(loss.detach())
    return world.sum([loss_total])[0]


def _clip(trainable: list[nn.Parameter], max_grad_norm: float | None) -> float:
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _rows(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` split along its first dim (rows: pairs, prompts) into parts of ``size``."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _objective_losses(model: nn.Module, batch: dict[str, torch.Tensor], micro_batch: int, device: torch.device,
                      autocast, world: World, objective, bare: nn.Module | None, step: int) -> float:
    """Backward of an objective's loss over this rank's rows: ``prepare`` (no gradients), then the module on
    each micro-batch, each summed loss divided by the objective's weight of the global batch (summed over
    ranks, so micro-batches and ranks add up to the one-batch loss). Returns the global loss."""
    local = shard_rows(batch, world)
    with torch.no_grad(), autocast:  # the reference's and GRPO's passes in the step's precision, as TRL's
        local = objective.prepare(bare if bare is not None else model, local, step, world)
    n = world.sum([float(objective.weight(local))])[0] or 1.0
    objective.step_tokens = int(local["input_ids"].numel()) * world.size  # what trains (GRPO: the completion rows)
    return _backward(model, _rows(local, micro_batch), lambda part: model(**{k: v.to(device) for k, v in part.items()}),
                     n, autocast, world)


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler,
               recipe, device: torch.device, autocast, trainable: list[nn.Parameter],
               world: World = SINGLE, objective=None, bare: nn.Module | None = None, step: int = 0) -> StepResult:
    """One optimizer step of ``recipe`` on ``batch``; ``scheduler`` may be None.

    Raises :class:`NonFiniteStep` when the loss or the gradient norm is not finite (weights untouched),
    or when the update made a trainable weight NaN/Inf (a finite gradient can still overflow a weight:
    an absurd weight decay, a bf16 weight past its range). Then the weights are already corrupt, and
    the caller must not save them; the check is one fused reduction per step (and, in a launched run,
    agreed by all ranks: each checks its own shards).
    """
    loss, grad_norm = forward_backward(model, batch, recipe.micro_batch_size, recipe.max_grad_norm, device,
                                       autocast, trainable, world, objective, bare, step)
    metrics = objective.sums.take(world) if objective is not None and not objective.lm_batches else {}
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep("loss" if not math.isfinite(loss) else "gradient norm",
                            loss if not math.isfinite(loss) else grad_norm)
    optimizer.step()
    bad = first_non_finite(trainable)
    if world.any(bad is not None):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep("weights", _nan_or_inf(local_part(trainable[bad])) if bad is not None else math.nan)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = objective.step_tokens if objective is not None and not objective.lm_batches else batch["input_ids"].numel()
    return StepResult(loss, grad_norm, tokens, metrics)


def _nan_or_inf(tensor: torch.Tensor) -> float:
    return math.nan if bool(tensor.isnan().any()) else math.inf


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, autocast, max_batches: int | None = None,
             world: World = SINGLE, objective=None, bare: nn.Module | None = None,
             metrics: dict[str, float] | None = None) -> float:
    """Token-weighted mean cross-entropy over (up to ``max_batches`` of) ``batches``; in a launched
    run each rank takes its rows of every batch and the sums are added over ranks. An objective that does
    not train on causal-LM batches gives its own mean loss (each batch through its ``prepare``, step -1),
    and what its module measured goes into ``metrics`` (e.g. ``rewards/accuracies``)."""
    was_training = model.training
    model.eval()
    custom = objective is not None and not objective.lm_batches
    if custom:
        objective.sums.take()  # nothing from a step is mixed in (every rank: the same, local)
    total, count = 0.0, 0
    try:
        for i in range(len(batches)):
            if max_batches is not None and i >= max_batches:
                break
            if custom:
                with autocast:
                    batch = objective.prepare(bare if bare is not None else model,
                                              shard_rows(batches.batch(0, i), world), -1, world)
                    total += float(model(**{k: v.to(device) for k, v in batch.items()}))
                count += objective.weight(batch)
                continue
            batch = shard_batch(batches.batch(0, i), world)
            x, y = batch["input_ids"].to(device), batch["labels"].to(device)
            p = batch.get("position_ids")
            with autocast:
                total += float(loss_sum(model, x, y, None if p is None else p.to(device)))
            count += _weight(objective, batch)
    finally:
        model.train(was_training)
    total, count = world.sum([total, count])
    if custom:  # a collective: every rank takes, whether or not the caller wants the metrics
        measured = objective.sums.take(world)
        if metrics is not None:
            metrics.update(measured)
    if count == 0:
        raise LoratuneError("the validation data has no target tokens" if not custom else
                            "the validation data gives the objective nothing to score")
    return total / count
