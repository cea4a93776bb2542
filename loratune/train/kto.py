"""``kto``: Kahneman-Tversky Optimization (Ethayarajh et al. 2024), as TRL 1.16's KTOTrainer computes it.

A batch holds unpaired examples (``data = "unpaired"``): ``input_ids`` and ``labels`` (B, 2, T), row 0 the
prompt with its completion, row 1 the KL row (the same prompt with a mismatched completion, TRL's rule),
and ``desirable`` (B,) bool. The reference is the model with its adapters switched off (for the
completions, or the batch's precomputed ``ref_logps[:, 0]``; a KL row pairs an item with its batch
neighbour's completion, so its reference is computed each step).

The KL term z0 is estimated from the KL rows without gradients: the mean over the (global) batch of the
policy's minus the reference's summed log-probs, clamped at 0. :meth:`KTOObjective.prepare` computes it on
this rank's rows and sums over ranks, so every micro-batch and rank uses the one value (TRL takes it per
micro-batch and averages it over ranks: the same when a step is one micro-batch). Each example's loss is
``desirable_weight (1 - sigmoid(beta (r - z0)))`` or ``undesirable_weight (1 - sigmoid(beta (z0 - r)))``,
r its log-ratio to the reference; the loss is their mean over the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..dist.world import SINGLE, World
from ..errors import ConfigError
from .logps import has_adapters, reference_sums, token_logps
from .objective import ObjectiveModule, register_objective
from .preference import ReferenceObjective, check_reference


class KTOLoss(ObjectiveModule):
    """KTO's loss over (B, 2, T) rows (the completions; the KL rows only through the batch's ``kl``)."""

    def __init__(self, model: nn.Module, objective: KTOObjective) -> None:
        super().__init__(model)
        self.objective = objective
        self.adapters = has_adapters(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, desirable: torch.Tensor,
                kl: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
        x, y = input_ids[:, 0], labels[:, 0]  # (b, T): prompt + completion
        policy = token_logps(self.model, x, y)
        if ref_logps is not None:
            ref = ref_logps[:, 0].to(device=x.device, dtype=torch.float32)
        elif self.adapters:
            ref = reference_sums(self.model, x, y)
        else:
            raise ConfigError("objective kto: the batch carries no precomputed ref_logps and the model has no "
                              "adapter to switch off for the reference")
        if kl is None:  # not prepared (a direct call): this micro-batch's estimate, as TRL's
            total, count = kl_sums(self.model, input_ids, labels)
            kl = torch.full_like(ref, max(total / max(count, 1), 0.0))
        return self.objective.example_loss(policy, y, desirable.to(x.device).bool(), ref,
                                           kl.to(device=x.device, dtype=torch.float32))


@torch.no_grad()
def kl_sums(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The sum over the KL rows (``[:, 1]``) of the policy's minus the reference's log-probs, and their count.
    The reference is always computed here (adapters off): a KL row depends on the batch its item is drawn
    in, so it is never precomputed."""
    x, y = input_ids[:, 1], labels[:, 1]
    policy = token_logps(model, x, y, stats=False).sums()
    return float((policy - reference_sums(model, x, y)).double().sum()), int(x.shape[0])


@register_objective
class KTOObjective(ReferenceObjective):
    """KTO on unpaired desirable/undesirable completions; see the module docstring."""

    name = "kto"
    data = "unpaired"
    precomputable = False  # only the completions' reference: the KL rows' depends on the batch

    def __init__(self, recipe=None) -> None:
        super().__init__(recipe)
        self.sums.differences["rewards/margins"] = ("rewards/chosen", "rewards/rejected")  # TRL's, batch means

    def fsdp_refusal(self) -> str | None:
        return ("it estimates its KL from the model before each step's forward, outside the pass in which FSDP2 "
                "gathers the shared weights")

    def module(self, model: nn.Module) -> nn.Module:
        check_reference(self, has_adapters(model))
        return KTOLoss(model, self)

    def sequences_per_row(self) -> int:
        """One sequence a row runs with gradients: the completion (the KL row and the reference, without)."""
        return 1

    def prepare(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int,
                world: World = SINGLE) -> dict[str, torch.Tensor]:
        """Adds ``kl`` (B,): the KL estimate of the global batch (summed over ranks), clamped at 0."""
        device = next(model.parameters()).device
        size = getattr(self.recipe, "micro_batch_size", None) or batch["input_ids"].shape[0]
        total, count = 0.0, 0
        for i in range(0, batch["input_ids"].shape[0], size):  # a micro-batch at a time: the logits it holds
            part = kl_sums(model, batch["input_ids"][i:i + size].to(device), batch["labels"][i:i + size].to(device))
            total, count = total + part[0], count + part[1]
        total, count = world.sum([total, float(count)])
        kl = max(total / count, 0.0) if count else 0.0
        return {**batch, "kl": torch.full((batch["input_ids"].shape[0],), kl, dtype=torch.float32)}

    def example_loss(self, policy, labels: torch.Tensor, desirable: torch.Tensor, ref: torch.Tensor,
                     kl: torch.Tensor) -> torch.Tensor:
        """The summed loss of the examples (policy: their TokenLogps; ref, kl: (b,)); records the metrics."""
        cfg = self.config
        logps = policy.sums()
        ratios = logps - ref
        losses = torch.where(desirable, cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratios - kl))),
                             cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - ratios))))
        self._log(policy, labels, desirable, cfg.beta * ratios.detach(), logps.detach(), kl)
        return losses.sum()

    def _log(self, policy, labels: torch.Tensor, desirable: torch.Tensor, rewards: torch.Tensor,
             logps: torch.Tensor, kl: torch.Tensor) -> None:
        """TRL's KTO metrics; every name is added on every call (count 0 when a side is absent), so that the
        ranks sum the same names."""
        b = desirable.shape[0]
        undesirable = ~desirable
        n_des, n_und = int(desirable.sum()), int(undesirable.sum())
        tokens = (labels != -100).sum(-1).float()
        self.sums.add("kl", kl.sum(), b)
        self.sums.add("entropy", policy.entropy_sums, float(tokens.sum()))
        logit_means = policy.logit_sums / policy.vocab
        self.sums.add("logits/chosen", logit_means[desirable], float(tokens[desirable].sum()))
        self.sums.add("logits/rejected", logit_means[undesirable], float(tokens[undesirable].sum()))
        self.sums.add("rewards/chosen", rewards[desirable], n_des)
        self.sums.add("rewards/rejected", rewards[undesirable], n_und)
        self.sums.add("logps/chosen", logps[desirable], n_des)
        self.sums.add("logps/rejected", logps[undesirable], n_und)
