"""GRPO (DeepSeekMath; TRL's ``GRPOTrainer``): rewarded completions sampled while training.

Each step, :meth:`GRPOObjective.prepare` takes this rank's prompts and, for each, samples a group of
``grpo.group_size`` completions with the adapter being trained (``rollout.py``: loratune's engine,
seeded per completion), scores them with the recipe's reward functions (``rewards.py``), and turns the
weighted sum of the rewards into group-relative advantages, as TRL's ``_generate_and_score_completions``
does: ``(r - mean of the group) / (std + 1e-4)``, the std (Bessel-corrected, TRL's ``nanstd``) over the
group, over the whole batch (``scale_rewards: batch``; over every rank), or none (Dr. GRPO). The prepared
batch holds the prompt+completion rows in loratune's SFT layout, one row of G per prompt:

- ``input_ids`` (B, G, T), ``labels`` (B, G, T): -100 on the prompt and the padding, so the labels are
  the completion's tokens (its stop token included, as TRL trains on the EOS it samples);
- ``advantages`` (B, G) float32;
- ``ref_logps`` (B, G, T) float32 when ``beta`` > 0: the reference (the base, adapters off) per token.

The module (:class:`GRPOLoss`) is TRL 1.16's ``_compute_loss`` with one policy iteration per rollout:
per-token log-probabilities of the temperature-scaled logits (TRL scores what it sampled from), the ratio
to the same log-probabilities detached (1 in value, the policy gradient in its gradient: TRL's
``old_per_token_logps = per_token_logps.detach()``), clipped to [1 - epsilon, 1 + epsilon_high],
``-min(ratio * A, clipped * A)`` plus ``beta`` times the k3 estimate of the KL to the reference, times the
ratio (TRL's default ``use_bias_correction_kl``: 1 in value, but it makes the KL's gradient the unbiased
reverse-KL one), and the ``loss_type``'s reduction. No ``old_logps`` is computed for the batch (the ratio's
denominator is the forward's own, detached: one forward fewer, and exactly TRL's value with LoRA dropout
on); a batch that carries ``old_logps`` (B, G, T) (several updates per rollout) is scored against them.
The module returns the sum and :meth:`GRPOObjective.weight` the divisor, so that micro-batches and ranks
add up to TRL's loss of the whole batch at once:

- ``grpo``: each completion's mean over its tokens, averaged over the completions (weight: B x G);
- ``bnpo`` and ``dapo``: the sum over every completion token divided by their count (weight: the
  tokens). TRL's bnpo divides by each micro-batch's own tokens and its dapo by the whole generation
  batch's; over one batch, the loss this computes, they are the same;
- ``dr_grpo``: the sum divided by B x G x max_new_tokens.

Metrics (TRL's names, averaged over the step): ``reward``, ``reward_std``, ``rewards/<name>/mean`` and
``/std``, ``frac_reward_zero_std``, ``completions/mean_length``, ``completions/clipped_ratio``,
``entropy``, ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``, ``kl`` (beta > 0), and the seconds
of the rollout (``rollout_s``: the sampling) and of the scoring (``score_s``: decoding, rewards,
advantages and the reference's pass), beside the step's own time, which the loop measures.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch import nn

from ..adapters.lora import adapters_disabled
from ..data.examples import IGNORE_INDEX
from ..dist.world import SINGLE, World
from ..errors import ConfigError, DataError
from ..recipe import GRPOConfig
from .logps import token_logps
from .objective import MetricSums, Objective, ObjectiveModule, register_objective
from .precision import autocast_for
from .rewards import Completions, Reward, build_rewards, score_completions
from .rollout import Group, Sampler, stop_ids, timed_sample

STD_EPSILON = 1e-4
"""Added to the std the advantages are divided by (TRL's)."""


# --------------------------------------------------------------------------------------------- advantages
def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """TRL's ``nanstd``: the Bessel-corrected std ignoring NaNs (NaN for fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    variance = torch.nanmean((x - mean) ** 2, dim=dim) if dim is not None else torch.nanmean((x - mean) ** 2)
    count = torch.sum(~torch.isnan(x), dim=dim) if dim is not None else torch.sum(~torch.isnan(x))
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan"), dtype=x.dtype))
    return torch.sqrt(variance * correction)


def global_nanstd(x: torch.Tensor, world: World = SINGLE) -> torch.Tensor:
    """:func:`nanstd` of the values of every rank (each passes its own ``x``); on one process exactly TRL's."""
    if world.size == 1:
        return nanstd(x)
    keep = x[~torch.isnan(x)].double()
    total, count = world.sum([float(keep.sum()), float(keep.numel())])
    mean = total / count if count else float("nan")
    (squares,) = world.sum([float(((keep - mean) ** 2).sum())])
    return torch.tensor((squares / (count - 1)) ** 0.5 if count > 1 else float("nan"), dtype=x.dtype)


def group_advantages(per_func: torch.Tensor, weights: torch.Tensor, group_size: int, scale_rewards: str,
                     world: World = SINGLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's advantages (``multi_objective_aggregation: sum_then_normalize``) of ``per_func`` (N, F): each
    reward function's value per completion, NaN where it does not apply, completions in groups of
    ``group_size``. Returns (advantages (N,), rewards (N,): the weighted sums, the std each was scaled by (N,))."""
    rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(per_func).all(dim=1)] = torch.nan  # scored by no function: advantage 0 (TRL's)
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size, dim=0)
    if scale_rewards in ("group", "none"):  # none: the std only says which groups have no signal
        std = nanstd(grouped, dim=1).repeat_interleave(group_size, dim=0)
    else:
        std = global_nanstd(rewards, world).expand_as(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0), rewards, std


# --------------------------------------------------------------------------------------------- log-probs
# --------------------------------------------------------------------------------------------- the loss
class GRPOLoss(ObjectiveModule):
    """The model and TRL's GRPO loss: ``forward`` returns the summed loss of its rows (see the module
    docstring for what it is divided by)."""

    def __init__(self, model: nn.Module, cfg: GRPOConfig, sums: MetricSums) -> None:
        super().__init__(model)
        self.cfg, self.sums = cfg, sums

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor,
                ref_logps: torch.Tensor | None = None, old_logps: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        x, y = input_ids.flatten(0, 1), labels.flatten(0, 1)  # (b, G, T) -> (b*G, T)
        scored = token_logps(self.model, x, y, temperature=cfg.temperature)
        logps, maskf = scored.logps, scored.mask.float()
        old = logps.detach() if old_logps is None else old_logps.flatten(0, 1)
        adv = advantages.flatten().unsqueeze(1).float()  # (b*G, 1)
        ratio = torch.exp(logps - old)
        eps_low, eps_high = cfg.epsilon, cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
        if cfg.beta != 0.0:
            ref = ref_logps.flatten(0, 1)
            kl = (torch.exp(ref - logps) - (ref - logps) - 1) * ratio  # TRL's use_bias_correction_kl (default)
            per_token = per_token + cfg.beta * kl
            self.sums.add("kl", (kl.detach() * maskf).sum(), float(maskf.sum()))
        if cfg.loss_type == "grpo":
            loss = ((per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).sum()
        else:  # bnpo, dapo, dr_grpo: the tokens' sum (the weight says what it is divided by)
            loss = (per_token * maskf).sum()
        with torch.no_grad():
            tokens = float(maskf.sum())
            low = ((ratio < 1 - eps_low) & (adv < 0)).float()
            high = ((ratio > 1 + eps_high) & (adv > 0)).float()
            self.sums.add("entropy", scored.entropy_sums.sum(), tokens)
            self.sums.add("clip_ratio/low_mean", (low * maskf).sum(), tokens)
            self.sums.add("clip_ratio/high_mean", (high * maskf).sum(), tokens)
            self.sums.add("clip_ratio/region_mean", (torch.maximum(low, high) * maskf).sum(), tokens)
        return loss


# --------------------------------------------------------------------------------------------- the objective
@register_objective
class GRPOObjective(Objective):
    """GRPO; see the module docstring. Its knobs are the recipe's ``grpo`` section."""

    name = "grpo"
    data = "prompts"

    def __init__(self, recipe=None) -> None:
        super().__init__(recipe)
        self.cfg: GRPOConfig = recipe.grpo if recipe is not None else GRPOConfig()
        self.seed: int = recipe.seed if recipe is not None else 0
        self.rewards: list[Reward] = []
        self.records: dict[int, dict] = {}
        """Each item's source record by its uid (reward functions read reference fields from them)."""
        self.tokenizer = None
        self.sampler: Sampler | None = None

    def fsdp_refusal(self) -> str | None:
        return ("it samples its completions on each rank apart, and FSDP2's ranks must run every forward together "
                "(each gathers the others' shards), which rows stopping at different lengths cannot do")

    def sequences_per_row(self) -> int:
        return self.cfg.group_size

    def extra_memory(self, model: nn.Module, micro_batch: int, seq_len: int) -> int:
        """The scored logits (the base's term), and the rollout's KV cache: every prompt of the batch with its G
        completions at once (made for each rollout and freed before the step's forward; counted beside it)."""
        rows = (self.recipe.batch_size if self.recipe is not None else micro_batch) * self.cfg.group_size
        per_position = model.new_cache(1, 1, rings=False).nbytes() if hasattr(model, "new_cache") else 0
        return super().extra_memory(model, micro_batch, seq_len) + rows * self.sequence_len(seq_len) * per_position

    def sequence_len(self, seq_len: int) -> int:
        """A completion row: a prompt of up to ``seq_len`` tokens and up to ``max_new_tokens`` sampled ones."""
        return seq_len + self.cfg.max_new_tokens

    def setup(self, model: nn.Module, tokenizer, data, device: torch.device, world: World = SINGLE) -> None:
        """Build the reward functions (ConfigError: none, or a malformed one), the sampler (the tokenizer's
        stop ids) and the uid -> record map of the data's items."""
        self.rewards = build_rewards(self.cfg.rewards)
        context = getattr(getattr(model, "config", None), "context_length", None)
        seq_len = getattr(self.recipe, "seq_len", 0)
        if context is not None and seq_len + self.cfg.max_new_tokens > context:
            raise ConfigError(f"a prompt of up to seq_len={seq_len} tokens and grpo.max_new_tokens="
                              f"{self.cfg.max_new_tokens} sampled after it exceed the model's context of {context} "
                              f"tokens: lower seq_len (the prompts' limit) or grpo.max_new_tokens")
        self.tokenizer = tokenizer
        self.sampler = Sampler(self.cfg, self.seed, stop_ids(tokenizer) if tokenizer is not None else [])
        if data is not None:
            for batches in (data.batches, data.val_batches):
                if batches is not None:
                    self.add_records(batches.examples)

    def add_records(self, items) -> None:
        """Remember the records of prompt ``items`` (each with ``uid`` and ``record``)."""
        for item in items:
            self.records[int(item.uid)] = item.record

    def prepare(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int,
                world: World = SINGLE) -> dict[str, torch.Tensor]:
        cfg, G = self.cfg, self.cfg.group_size
        lens, uids = batch["prompt_lens"].tolist(), batch["uid"].tolist()
        prompts = [row[:n] for row, n in zip(batch["input_ids"].tolist(), lens)]
        groups, rollout_s = timed_sample(self.sampler, model, prompts, uids, step)
        start = time.perf_counter()
        completions = self._completions(prompts, uids, groups)
        completions.state = SimpleNamespace(global_step=max(step, 0))  # TRL's trainer_state, for user functions
        per_func = score_completions(self.rewards, completions)  # (B*G, F)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        advantages, rewards, std = group_advantages(per_func, weights, G, cfg.scale_rewards, world)
        out = completion_rows(prompts, groups, self.tokenizer.pad_id if self.tokenizer is not None else 0)
        out["advantages"] = advantages.view(len(prompts), G)
        device = next(model.parameters()).device
        if cfg.beta != 0.0:
            out["ref_logps"] = self.reference_logps(model, out, device)
        self.measure_rewards(per_func, rewards, std, groups, world)
        self.sums.add("rollout_s", rollout_s, 1)
        self.sums.add("score_s", time.perf_counter() - start, 1)
        return out

    def _completions(self, prompts: list[list[int]], uids: list[int], groups: list[Group]) -> Completions:
        field = self.cfg.prompt_field
        texts, ids, records, shown, row_uids = [], [], [], [], []
        for uid, group in zip(uids, groups):
            if uid not in self.records:
                raise DataError(f"the prompt batch names item {uid}, whose record the grpo objective was not given "
                                "(its setup reads the session's data; a batch built by hand needs "
                                "objective.add_records(items))")
            record = self.records[uid]
            for tokens in group.tokens:
                texts.append(self.tokenizer.decode(tokens, skip_special=True) if self.tokenizer is not None else "")
                ids.append(tokens)
                records.append(record)
                shown.append(record.get(field))
                row_uids.append(uid)
        return Completions(shown, texts, ids, records, row_uids)

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, out: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """(B, G, T) the reference's per-token log-probs (adapters off), a micro-batch of prompts at a time,
        under the step's autocast (TRL computes them in the same precision as the policy's)."""
        B, G, T = out["labels"].shape
        size = self.recipe.micro_batch_size if self.recipe is not None else B
        autocast = autocast_for(self.recipe.precision, device) if self.recipe is not None else nullcontext()
        parts = []
        with adapters_disabled(model), autocast:
            for i in range(0, B, size):
                x = out["input_ids"][i:i + size].flatten(0, 1).to(device)  # (b*G, T)
                y = out["labels"][i:i + size].flatten(0, 1).to(device)
                scored = token_logps(model, x, y, stats=False, temperature=self.cfg.temperature)
                parts.append(scored.logps.float().view(-1, G, T))
        return torch.cat(parts)

    def measure_rewards(self, per_func: torch.Tensor, rewards: torch.Tensor, std: torch.Tensor, groups: list[Group],
                        world: World = SINGLE) -> None:
        """Add TRL's reward and completion metrics of this rank's rollout to :attr:`sums` (the stds are those of
        every rank's values: a collective, which every rank calls)."""
        n = rewards.numel()
        self.sums.add("reward", torch.nansum(rewards), float((~torch.isnan(rewards)).sum()))
        self.sums.add("reward_std", global_nanstd(rewards, world), 1)
        self.sums.add("frac_reward_zero_std", torch.isclose(std, torch.zeros_like(std)).float().sum(), n)
        for f, reward in enumerate(self.rewards):
            column = per_func[:, f]
            self.sums.add(f"rewards/{reward.name}/mean", torch.nansum(column), float((~torch.isnan(column)).sum()))
            self.sums.add(f"rewards/{reward.name}/std", global_nanstd(column, world), 1)
        lengths = [len(t) for g in groups for t in g.tokens]
        self.sums.add("completions/mean_length", float(sum(lengths)), len(lengths))
        self.sums.add("completions/clipped_ratio", float(sum(t for g in groups for t in g.truncated)), len(lengths))

    def module(self, model: nn.Module) -> nn.Module:
        return GRPOLoss(model, self.cfg, self.sums)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch["labels"]  # (B, G, T)
        if self.cfg.loss_type == "grpo":
            return labels.shape[0] * labels.shape[1]
        if self.cfg.loss_type == "dr_grpo":
            return labels.shape[0] * labels.shape[1] * self.cfg.max_new_tokens
        return int((labels != IGNORE_INDEX).sum())


def completion_rows(prompts: list[list[int]], groups: list[Group], pad_id: int) -> dict[str, torch.Tensor]:
    """The prompt+completion sequences in loratune's layout: ``input_ids`` = seq[:-1], ``labels`` = seq[1:]
    with -100 on the prompt and the padding (right-padded with ``pad_id``), (B, G, T)."""
    B, G = len(prompts), len(groups[0].tokens)
    T = max(len(p) + len(t) for p, g in zip(prompts, groups) for t in g.tokens) - 1
    input_ids = torch.full((B, G, T), pad_id, dtype=torch.long)
    labels = torch.full((B, G, T), IGNORE_INDEX, dtype=torch.long)
    for b, (prompt, group) in enumerate(zip(prompts, groups)):
        for g, tokens in enumerate(group.tokens):
            seq = prompt + tokens
            input_ids[b, g, :len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
            if tokens:
                labels[b, g, len(prompt) - 1:len(seq) - 1] = torch.tensor(tokens, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}
