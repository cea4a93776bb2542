"""The training objective: what loss a step minimises over a batch (the recipe's ``objective``).

An objective turns the model into the module a step calls (and DDP/FSDP2 wrap, so their hooks
run around the loss too): ``objective.module(model)(**micro_batch)`` returns the batch's *summed*
loss, and ``objective.weight(batch)`` the count it is divided by for the whole (global) batch, so
that micro-batches and ranks add up to exactly the one-batch loss (see ``step.forward_backward``).

``sft`` is causal-LM / completion training: token cross-entropy over the positions whose label is
not -100 (the data pipeline masks prompts and padding). The preference objectives (``dpo``, ``ipo``,
``orpo``, ``simpo`` in ``preference.py``, ``kto`` in ``kto.py``) and ``grpo`` (``grpo.py``) are
registered by their modules, which the package imports.

Adding one: subclass :class:`Objective`, give it a ``name`` and the ``data`` it trains on, implement
``module`` (an :class:`ObjectiveModule` whose forward takes the batch's tensors by keyword and returns a scalar
summed loss) and ``weight``, and register it with :func:`register_objective`. Optional seams:
``setup`` (once, with the session's model, tokenizer and data: e.g. precomputed reference
log-probabilities), ``prepare`` (each step, no gradients, this rank's rows before the micro-batches:
e.g. GRPO's rollouts), and :attr:`Objective.sums`, where the module adds what it measures (TRL's
``rewards/chosen`` ...): the step averages them over micro-batches and ranks into its metrics row.
The loop, evaluation, DDP/FSDP2, checkpoints and the sinks need no change.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..dist.world import SINGLE, World
from ..errors import ConfigError
from .loss import CausalLMLoss, count_targets

DATA_KINDS = ("sft", "pairs", "unpaired", "prompts")
"""What an objective trains on: the recipe's data task (sft); prompt/chosen/rejected pairs (dpo ...);
KTO's unpaired prompt/completion/label; prompts whose completions are sampled while training (grpo)."""


class MetricSums:
    """Sums and counts of what an objective measures over a step's micro-batches (its module adds to them);
    :meth:`take` turns them into means over the whole step, over every rank."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self.differences: dict[str, tuple[str, str]] = {}
        """Metrics that are the difference of two others' step means (KTO's ``rewards/margins``: TRL's desirable
        mean minus its undesirable mean over the whole batch), where both were measured."""

    def add(self, name: str, total: float | torch.Tensor, count: float = 1) -> None:
        """Add ``total`` (a sum over ``count`` items: rows, pairs, tokens) to ``name``."""
        if isinstance(total, torch.Tensor):
            total = float(total.detach().double().sum())
        entry = self.totals.setdefault(name, [0.0, 0.0])
        entry[0] += total
        entry[1] += count

    def take(self, world: World = SINGLE) -> dict[str, float]:
        """The means so far (summed over ranks first: every rank calls this with the same names, a name with a
        count of 0 where it measured nothing), then empty."""
        names = sorted(self.totals)
        flat = world.sum([x for n in names for x in self.totals[n]]) if names else []
        self.totals = {}  # a name nothing was counted for (KTO: no undesirable example this step) is left out
        means = {n: flat[2 * i] / flat[2 * i + 1] for i, n in enumerate(names) if flat[2 * i + 1]}
        for name, (a, b) in self.differences.items():
            if a in means and b in means:
                means[name] = means[a] - means[b]
        return dict(sorted(means.items()))


class ObjectiveModule(nn.Module):
    """The base of an objective's module: it holds the model (``model``) and lets work outside the training
    forward reach it through :meth:`run` (samples and evaluation generate through it; FSDP2 registers ``run``
    as a forward, so the root unit's weights are gathered around it), as :class:`~.loss.CausalLMLoss` does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def run(self, fn, *args):
        """``fn(model, *args)``."""
        return fn(self.model, *args)


class Objective:
    """The loss of a batch; see the module docstring. Made with the (resolved) recipe, whose ``preference`` or
    ``grpo`` section holds its knobs (None: the defaults, e.g. in a test)."""

    name: ClassVar[str]
    """The recipe's ``objective`` value."""
    data: ClassVar[str] = "sft"
    """What it trains on, one of :data:`DATA_KINDS` (the data pipeline builds those batches)."""

    def __init__(self, recipe=None) -> None:
        self.recipe = recipe
        self.sums = MetricSums()
        """What the module measured this step (or this evaluation); see :class:`MetricSums`."""
        self.step_tokens = 0
        """Token positions of the last step's prepared batch over every rank (the step's throughput)."""

    @property
    def lm_batches(self) -> bool:
        """Whether a step runs the causal-LM path (input_ids, labels, position_ids; sft), rather than calling
        the module with every tensor of the batch and :meth:`prepare` first."""
        return False

    def fsdp_refusal(self) -> str | None:
        """Why this objective (with its knobs) cannot train under ``strategy: fsdp``; None: it can."""
        return None

    def sequences_per_row(self) -> int:
        """Sequences a step runs through the model with gradients per row of the batch (a pair: 2; GRPO: the
        group), for the memory guard's activations."""
        return 1 if self.lm_batches else 2

    def sequence_len(self, seq_len: int) -> int:
        """The longest sequence a step runs, for a recipe's ``seq_len`` (GRPO: the prompt and its completion)."""
        return seq_len

    def extra_memory(self, model: nn.Module, micro_batch: int, seq_len: int) -> int:
        """Bytes a micro-batch's step holds besides what ``train.guards`` counts for causal-LM training: for an
        objective that scores log-probabilities (``train.logps``), the float32 logits of every sequence it runs
        with gradients, their log-softmax and the gradient arriving for them (the fused, chunked loss of sft
        never holds them whole)."""
        if self.lm_batches:
            return 0
        vocab = model.lm_head.weight.shape[0]
        return 3 * 4 * micro_batch * self.sequences_per_row() * self.sequence_len(seq_len) * vocab

    def setup(self, model: nn.Module, tokenizer, data, device: torch.device, world: World = SINGLE) -> None:
        """Once, when the session is made (``data``: its TrainingData): e.g. precompute reference log-probs."""

    def prepare(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int,
                world: World = SINGLE) -> dict[str, torch.Tensor]:
        """Each step (``step``: the optimizer step about to run, 0-based) and each evaluation batch (``step``
        -1), without gradients, on this rank's rows before they are split into micro-batches; returns the
        batch the module is called with (e.g. GRPO's sampled completions). ``model`` is the bare model (not
        the DDP/FSDP2 wrapper). Every tensor of the result has the rows (prompts, pairs) as its first dim."""
        return batch

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

    @property
    def lm_batches(self) -> bool:
        return True

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


def make_objective(name: str, recipe=None) -> Objective:
    """The objective a recipe names (``recipe``: its knobs); a ConfigError naming the known ones otherwise."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(sorted(OBJECTIVES))}, got {name!r}")
    objective = OBJECTIVES[name](recipe)
    reason = objective.fsdp_refusal() if getattr(recipe, "strategy", None) == "fsdp" else None
    if reason:
        raise ConfigError(f"objective {name} cannot run with strategy: fsdp: {reason}; use strategy: ddp")
    return objective
