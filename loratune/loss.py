"""The causal-LM loss: summed token cross-entropy, so micro-batches add up exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over positions whose label is not -100 (labels are already shifted).

    Logits are upcast to float32 for the softmax, as in every reference implementation.
    """
    logits = model(input_ids)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    """Positions that contribute to the loss."""
    return int((labels != IGNORE).sum())
