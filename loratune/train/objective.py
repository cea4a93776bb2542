"""The training objective: what loss a step minimises over a batch (the recipe's ``objective``).

An objective turns the model into the module a step calls (and DDP/FSDP2 wrap, so their hooks
run around the loss too): ``objective.module(model)(**micro_batch)`` returns the batch's *summed*
loss, and ``objective.weight(batch)`` the count it is divided by for the whole (global) batch, so
that micro-batches and ranks add up to exactly the one-batch loss (see ``step.forward_backward``).

``sft`` is causal-LM / completion training: token cross-entropy over the positions whose label is
not -100 (the data pipeline masks prompts and padding). Preference (DPO) and RL (GRPO) objectives
come next; each is one class here (or in its own file) and one entry in :data:`OBJECTIVES`.

Adding one: subclass :class:`Objective`, give it a ``name``, implement ``module`` (an
``nn.Module`` whose forward takes the batch's tensors by keyword and returns a scalar summed loss)
and ``weight``, and register it with :func:`register_objective`. The loop, evaluation, DDP/FSDP2,
checkpoints and the sinks need no change.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .loss import CausalLMLoss, count_targets


class Objective:
    """The loss of a batch; see the module docstring."""

    name: ClassVar[str]
    """The recipe's ``objective`` value."""

    def module(self, model: nn.Module) -> nn.Module:
        """The model and its loss as one module: ``forward(input_ids=..., labels=..., ...)`` returns the
        summed loss of those rows. It holds ``model`` as its ``model`` attribute (generation and saving
        reach the model through it)."""
        raise NotImplementedError

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """What the summed loss of ``batch`` is divided by (e.g. its target tokens; may be 0, which a step
        treats as 1 and evaluation sums over batches and ranks first)."""
        raise NotImplementedError


class SFTObjective(Objective):
    """Causal-LM / completion cross-entropy, token-weighted (the mean over target tokens)."""

    name = "sft"

    def module(self, model: nn.Module) -> nn.Module:
        return CausalLMLoss(model)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch["labels"])


OBJECTIVES: dict[str, type[Objective]] = {}
"""Objectives by recipe name."""


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` available as ``objective: <cls.name>`` in recipes (usable as a class decorator)."""
    OBJECTIVES[cls.name] = cls
    return cls


register_objective(SFTObjective)


def make_objective(name: str) -> Objective:
    """The objective a recipe names; a ConfigError naming the known ones otherwise."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(sorted(OBJECTIVES))}, got {name!r}")
    return OBJECTIVES[name]()
