"""The pairwise preference objectives: ``dpo``, ``ipo``, ``orpo`` and ``simpo``, as TRL 1.16 computes them.

A batch holds pairs (``data = "pairs"``): ``input_ids`` and ``labels`` of shape (B, 2, T), row 0 the prompt
with the chosen completion, row 1 with the rejected one, the prompt's labels -100. The module runs the
policy once over the 2B rows; DPO and IPO also need the reference model, which for a LoRA run is the same
model with its adapters switched off, run without gradients in the same call (or read from the batch's
``ref_logps`` (B, 2) when ``preference.precompute_reference`` computed them once in :meth:`setup`).

- ``dpo`` (DPOTrainer): ``loss_type`` sigmoid (cDPO's ``label_smoothing``: the loss of TRL before 1.0,
  which TRL 1.16's sigmoid no longer takes), robust or hinge on beta times the difference of the chosen and
  rejected log-ratios to the reference (summed over completion tokens); ``sft_weight`` adds the chosen
  completions' token-mean NLL (RPO; TRL 1.16: ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, w]``).
- ``ipo`` (DPOTrainer's ipo): (d - 1/(2 beta))^2, d the difference of the log-ratios averaged over each
  completion's tokens.
- ``orpo`` (ORPOTrainer): the chosen rows' NLL (over prompt and completion, as TRL scores it) minus beta
  times log sigmoid of the log odds ratio of the token-averaged log-probs; no reference.
- ``simpo`` (CPOTrainer, loss_type simpo): -log sigmoid(beta (avg chosen - avg rejected) - gamma), gamma =
  ``gamma_beta_ratio`` beta, cDPO-smoothed by ``label_smoothing``, plus ``sft_weight`` (CPO's alpha) times
  the chosen completions' NLL; no reference.

The loss is the mean over pairs (:meth:`weight`: the pairs), as TRL's ``.mean()`` over its batch. A term
TRL takes as a token mean over its batch (the NLLs) is that token mean over each micro-batch, counted once
per pair: the same as TRL's with ``micro_batch_size`` as its per-device batch and gradient accumulation.
The metrics carry TRL's names (``rewards/chosen`` ... ``logits/rejected``, ORPO's ``nll_loss``,
``log_odds_ratio``, ``log_odds_chosen``) and its averaging.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..dist.world import SINGLE, World
from ..errors import ConfigError
from ..recipe import PreferenceConfig
from .logps import TokenLogps, has_adapters, precompute_reference, reference_sums, token_logps
from .objective import Objective, ObjectiveModule, register_objective


def preference_config(recipe) -> PreferenceConfig:
    """The recipe's ``preference`` section (None or absent: the defaults)."""
    section = getattr(recipe, "preference", None) if recipe is not None else None
    return section if section is not None else PreferenceConfig()


def check_reference(objective: ReferenceObjective, adapters: bool) -> None:
    """Refuse an objective that needs the reference model where the model has no adapters (a full
    fine-tune), unless the reference log-probs it needs are all precomputed from the starting weights."""
    precomputed = objective.config.precompute_reference and objective.precomputable
    if not objective.reference or adapters or precomputed:
        return
    fix = ("set preference.precompute_reference: true (the reference log-probs are then computed once from the "
           "starting weights, before training)" if objective.precomputable else
           f"preference.precompute_reference does not cover {objective.name}'s KL rows, which depend on the batch")
    raise ConfigError(
        f"objective {objective.name} needs the reference model, which loratune takes as the base model with the "
        "LoRA adapter switched off; finetune: full has no adapter to switch off (TRL would keep a second copy of "
        f"the model). Use finetune: lora, or {fix}")


class ReferenceObjective(Objective):
    """What the preference objectives share: their knobs, the reference (when needed) and its precompute."""

    reference: ClassVar[bool] = True
    """Whether the loss needs the reference model's log-probs."""
    precomputable: ClassVar[bool] = True
    """Whether precomputed reference log-probs (both rows of an item) are all the reference the loss needs."""

    def __init__(self, recipe=None) -> None:
        super().__init__(recipe)
        self.config = preference_config(recipe)
        if getattr(recipe, "finetune", "lora") == "full":
            check_reference(self, adapters=False)  # refused before the model loads

    def fsdp_refusal(self) -> str | None:
        if self.reference and self.config.precompute_reference:
            return ("preference.precompute_reference runs the model over the data before FSDP2 shards it onto the "
                    "devices (or compute the reference in each step's pass: precompute_reference: false)")
        return None

    def setup(self, model: nn.Module, tokenizer, data, device: torch.device, world: World = SINGLE) -> None:
        check_reference(self, has_adapters(model))
        if not (self.reference and self.config.precompute_reference):
            return
        size = getattr(self.recipe, "micro_batch_size", None) or 8
        for batches in (data.batches, data.val_batches):
            if batches is not None:
                precompute_reference(model, batches, size, device, second_row=self.precomputable)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The rows (pairs, or KTO's examples): the loss is their mean."""
        return int(batch["input_ids"].shape[0])


class PairLoss(ObjectiveModule):
    """A pair objective's loss over (B, 2, T) rows: the policy (and reference) pass, then the objective's
    :meth:`PairObjective.pair_loss`; returns the summed loss of the pairs."""

    def __init__(self, model: nn.Module, objective: PairObjective) -> None:
        super().__init__(model)
        self.objective = objective
        self.adapters = has_adapters(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                ref_logps: torch.Tensor | None = None) -> torch.Tensor:
        b = input_ids.shape[0]
        x, y = input_ids.flatten(0, 1), labels.flatten(0, 1)  # (b, 2, T) -> (2b, T): chosen, rejected, chosen ...
        policy = token_logps(self.model, x, self.objective.policy_labels(x, y))
        ref = None
        if self.objective.reference:
            if ref_logps is None:
                if not self.adapters:
                    raise ConfigError(f"objective {self.objective.name}: the batch carries no precomputed ref_logps "
                                      "and the model has no adapter to switch off for the reference")
                ref = reference_sums(self.model, x, y).view(b, 2)
            else:
                ref = ref_logps.to(device=x.device, dtype=torch.float32)
        return self.objective.pair_loss(policy, y.view(b, 2, -1) != IGNORE_INDEX, ref)


class PairObjective(ReferenceObjective):
    """An objective on chosen/rejected pairs (see the module docstring)."""

    data = "pairs"

    def module(self, model: nn.Module) -> nn.Module:
        check_reference(self, has_adapters(model))
        return PairLoss(model, self)

    def policy_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The targets the policy pass scores (the completions; ORPO's NLL also scores the prompt)."""
        return labels

    def pair_loss(self, policy: TokenLogps, completion: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """The summed loss of the pairs from the policy's token log-probs ((2b, T) rows), the completions'
        mask (b, 2, T) and the reference's summed log-probs (b, 2) or None; records the metrics."""
        raise NotImplementedError

    def _chosen_nll(self, policy: TokenLogps, mask: torch.Tensor) -> torch.Tensor:
        """The mean NLL over this micro-batch's chosen tokens where ``mask`` (b, T) says."""
        b = mask.shape[0]
        chosen = policy.logps.view(b, 2, -1)[:, 0]
        return -(chosen * mask).sum() / mask.sum().clamp(min=1)

    def _log_rewards(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                     logps: torch.Tensor) -> None:
        b = logps.shape[0]
        self.sums.add("rewards/chosen", chosen_rewards, b)
        self.sums.add("rewards/rejected", rejected_rewards, b)
        self.sums.add("rewards/accuracies", (chosen_rewards > rejected_rewards).float(), b)
        self.sums.add("rewards/margins", chosen_rewards - rejected_rewards, b)
        self.sums.add("logps/chosen", logps[:, 0], b)
        self.sums.add("logps/rejected", logps[:, 1], b)

    def _log_token_stats(self, policy: TokenLogps, completion: torch.Tensor) -> None:
        """DPOTrainer's token-weighted metrics: mean logits of the chosen and rejected completion tokens, the
        entropy over all completion tokens, the chosen tokens that are the argmax."""
        b = completion.shape[0]
        tokens = completion.sum(-1).float()  # (b, 2)
        logit_sums = policy.logit_sums.view(b, 2) / policy.vocab
        self.sums.add("logits/chosen", logit_sums[:, 0], float(tokens[:, 0].sum()))
        self.sums.add("logits/rejected", logit_sums[:, 1], float(tokens[:, 1].sum()))
        self.sums.add("entropy", policy.entropy_sums, float(tokens.sum()))
        self.sums.add("mean_token_accuracy", policy.top1.view(b, 2)[:, 0].float(), float(tokens[:, 0].sum()))

    def _log_all_logits(self, policy: TokenLogps, completion: torch.Tensor) -> None:
        """ORPO/CPO's ``logits/chosen``: the mean of every logit at every position of the chosen rows."""
        b, _, t = completion.shape
        sums = policy.all_logit_sums.view(b, 2)
        self.sums.add("logits/chosen", sums[:, 0], b * t * policy.vocab)
        self.sums.add("logits/rejected", sums[:, 1], b * t * policy.vocab)


@register_objective
class DPOObjective(PairObjective):
    """Direct Preference Optimization (Rafailov et al. 2023), TRL's DPOTrainer; see the module docstring."""

    name = "dpo"

    def pair_loss(self, policy: TokenLogps, completion: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        cfg, b = self.config, completion.shape[0]
        logps = policy.sums().view(b, 2)
        ratios = logps - ref  # (b, 2) log pi/pi_ref of chosen and rejected
        losses = self.losses(ratios, completion)
        if cfg.sft_weight:
            losses = losses + cfg.sft_weight * self._chosen_nll(policy, completion[:, 0])
        rewards = cfg.beta * ratios.detach()
        self._log_rewards(rewards[:, 0], rewards[:, 1], logps.detach())
        self._log_token_stats(policy, completion)
        return losses.sum()

    def losses(self, ratios: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        """(b,) each pair's loss from its log-ratios (b, 2)."""
        cfg = self.config
        z = cfg.beta * (ratios[:, 0] - ratios[:, 1])
        eps = cfg.label_smoothing
        if cfg.loss_type == "sigmoid":  # cDPO with label smoothing
            return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
        if cfg.loss_type == "robust":
            return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        if cfg.loss_type == "hinge":
            return torch.relu(1 - z)
        raise ConfigError(f"preference.loss_type {cfg.loss_type!r} is not a dpo loss")


@register_objective
class IPOObjective(DPOObjective):
    """Identity Preference Optimization (Azar et al. 2023), TRL's DPOTrainer with loss_type ipo: the
    log-ratios averaged over each completion's tokens. ``loss_type`` and ``label_smoothing`` are dpo's."""

    name = "ipo"

    def losses(self, ratios: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        avg = ratios / completion.sum(-1).clamp(min=1)  # (b, 2)
        return (avg[:, 0] - avg[:, 1] - 1 / (2 * self.config.beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (TRL's)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _average(policy: TokenLogps, completion: torch.Tensor) -> torch.Tensor:
    """(b, 2) each completion's mean token log-prob (TRL's average_log_prob)."""
    b = completion.shape[0]
    sums = (policy.logps.view(b, 2, -1) * completion).sum(-1)
    return sums / completion.sum(-1).clamp(min=1)


@register_objective
class ORPOObjective(PairObjective):
    """Odds Ratio Preference Optimization (Hong et al. 2024), TRL's ORPOTrainer: no reference model."""

    name = "orpo"
    reference = False

    def policy_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The labels with the prompt's targets filled in (TRL's ORPO NLL scores prompt and completion): every
        position before a row's first scored label predicts the next input token."""
        t = labels.shape[-1]
        scored = labels != IGNORE_INDEX
        first = scored.int().argmax(-1)  # (2b,); 0 for a row that scores nothing: no prompt targets either
        prompt = torch.arange(t, device=labels.device) < first.unsqueeze(-1)  # (2b, T)
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=-1)
        return torch.where(prompt, nxt, labels)

    def pair_loss(self, policy: TokenLogps, completion: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        b, beta = completion.shape[0], self.config.beta
        avg = _average(policy, completion)
        nll = self._chosen_nll(policy, policy.mask.view(b, 2, -1)[:, 0])
        log_odds = (avg[:, 0] - avg[:, 1]) - (log1mexp(avg[:, 0]) - log1mexp(avg[:, 1]))
        ratio = F.logsigmoid(log_odds)
        rewards = beta * avg.detach()
        self._log_rewards(rewards[:, 0], rewards[:, 1], avg.detach())
        self._log_all_logits(policy, completion)
        self.sums.add("nll_loss", nll.detach() * b, b)
        self.sums.add("log_odds_ratio", ratio.detach(), b)
        self.sums.add("log_odds_chosen", log_odds.detach(), b)
        return nll * b - beta * ratio.sum()


@register_objective
class SimPOObjective(PairObjective):
    """Simple Preference Optimization (Meng et al. 2024), TRL's CPOTrainer with loss_type simpo: no
    reference model; ``sft_weight`` is CPO's alpha (0: the published SimPO)."""

    name = "simpo"
    reference = False

    def pair_loss(self, policy: TokenLogps, completion: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        cfg, b = self.config, completion.shape[0]
        avg = _average(policy, completion)
        z = cfg.beta * (avg[:, 0] - avg[:, 1] - cfg.gamma_beta_ratio)
        eps = cfg.label_smoothing
        losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
        nll = self._chosen_nll(policy, completion[:, 0]) if cfg.sft_weight else torch.zeros((), device=z.device)
        rewards = cfg.beta * avg.detach()
        self._log_rewards(rewards[:, 0], rewards[:, 1], avg.detach())
        self._log_all_logits(policy, completion)
        self.sums.add("nll_loss", nll.detach() * b, b)
        return losses.sum() + cfg.sft_weight * nll * b
