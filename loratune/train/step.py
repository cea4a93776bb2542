"""The one training step, used by the loop, ``compare`` and the benchmark alike, and evaluation.

:func:`train_step` is forward and backward over the step's micro-batches (the loss
token-weighted over the whole batch), the gradient norm and clipping, the non-finite check,
AdamW and the schedule. Nothing else in loratune updates weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoratuneError
from ..hub.finite import first_non_finite
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
    """Mean cross-entropy over the step's target tokens."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Token positions in the batch (padding included), for throughput."""


def forward_backward(model: nn.Module, batch: dict[str, torch.Tensor], micro_batch: int, max_grad_norm: float | None,
                     device: torch.device, autocast, trainable: list[nn.Parameter]) -> tuple[float, float]:
    """Gradients of one optimizer step's batch, in micro-batches of ``micro_batch`` rows, then clipped.

    The loss is token-weighted over the whole batch (each micro-batch's summed loss is divided by
    the batch's target count), so the split changes memory, not the result. Returns the step's
    loss and the gradient norm before clipping; the norm is taken even without clipping
    (max_norm inf), so an Inf gradient is seen.
    """
    x_all, y_all = batch["input_ids"].to(device), batch["labels"].to(device)
    p_all = batch.get("position_ids")  # packed rows
    p_parts = p_all.to(device).split(micro_batch) if p_all is not None else [None] * len(x_all.split(micro_batch))
    n_targets = max(1, count_targets(y_all))
    loss_total = 0.0
    for x, y, p in zip(x_all.split(micro_batch), y_all.split(micro_batch), p_parts):
        with autocast:
            loss = lm_loss_sum(model, x, y, p) / n_targets
        loss.backward()
        loss_total += float(loss.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf))
    return loss_total, grad_norm


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler,
               recipe, device: torch.device, autocast, trainable: list[nn.Parameter]) -> StepResult:
    """One optimizer step of ``recipe`` on ``batch``; ``scheduler`` may be None.

    Raises :class:`NonFiniteStep` when the loss or the gradient norm is not finite (weights untouched),
    or when the update made a trainable weight NaN/Inf (a finite gradient can still overflow a weight:
    an absurd weight decay, a bf16 weight past its range). Then the weights are already corrupt, and
    the caller must not save them; the check is one fused reduction per step.
    """
    loss, grad_norm = forward_backward(model, batch, recipe.micro_batch_size, recipe.max_grad_norm, device,
                                       autocast, trainable)
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep("loss" if not math.isfinite(loss) else "gradient norm",
                            loss if not math.isfinite(loss) else grad_norm)
    optimizer.step()
    bad = first_non_finite(trainable)
    if bad is not None:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep("weights", _nan_or_inf(trainable[bad]))
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, batch["input_ids"].numel())


def _nan_or_inf(tensor: torch.Tensor) -> float:
    return math.nan if bool(tensor.isnan().any()) else math.inf


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, autocast, max_batches: int | None = None) -> float:
    """Token-weighted mean cross-entropy over (up to ``max_batches`` of) ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(len(batches)):
        if max_batches is not None and i >= max_batches:
            break
        batch = batches.batch(0, i)
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        p = batch.get("position_ids")
        with autocast:
            total += float(lm_loss_sum(model, x, y, None if p is None else p.to(device)))
        count += count_targets(y)
    model.train(was_training)
    if count == 0:
        raise LoratuneError("the validation data has no target tokens")
    return total / count
