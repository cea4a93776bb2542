"""The knobs of the objectives after SFT: the recipe's ``preference:`` section (dpo, ipo, orpo, simpo, kto) and
its ``grpo:`` section, named as in TRL's configs; the objectives themselves are in ``loratune/train/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .checks import check_number

OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo")
"""The built-in objectives (train/objective.py registers each; a plugin may register more)."""
PREFERENCE_LOSSES = ("sigmoid", "robust", "hinge")
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class PreferenceConfig:
    """The knobs of the preference objectives (dpo, ipo, orpo, simpo, kto), named as in TRL's configs."""

    beta: float = 0.1
    """How far the policy may move from the reference (DPO/IPO/KTO), or the scale of the log-odds (ORPO) and of
    the length-normalised margin (SimPO). TRL's defaults: 0.1 for DPO, IPO, ORPO and KTO; SimPO's paper uses 2.0."""
    loss_type: str = "sigmoid"
    """dpo: 'sigmoid' (the paper's), 'robust' (label noise, Chowdhury et al.) or 'hinge' (SLiC)."""
    label_smoothing: float = 0.0
    """The assumed share of flipped labels: cDPO (sigmoid) and robust DPO; SimPO's too. In [0, 0.5)."""
    gamma_beta_ratio: float = 0.5
    """simpo: the target margin gamma divided by beta (TRL's CPOConfig.simpo_gamma / beta; the paper's 0.5)."""
    sft_weight: float = 0.0
    """The weight of the chosen completions' NLL added to the loss: RPO's alpha for dpo, CPO's alpha for simpo
    (0: the published SimPO). orpo always adds its NLL term (its lambda is beta)."""
    desirable_weight: float = 1.0
    """kto: the weight of desirable examples' losses (TRL's desirable_weight)."""
    undesirable_weight: float = 1.0
    """kto: the weight of undesirable examples' losses."""
    precompute_reference: bool = False
    """Compute the reference log-probabilities (adapter off) once over the data before training, instead of in
    every step's pass (one forward fewer a step; the data's log-probs are held in memory)."""

    def __post_init__(self) -> None:
        check_number("preference.beta", self.beta, 0, low_open=True)
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ConfigError(f"preference.loss_type must be one of {', '.join(PREFERENCE_LOSSES)}, got "
                              f"{self.loss_type!r}")
        check_number("preference.label_smoothing", self.label_smoothing, 0, 0.5, high_open=True)
        check_number("preference.gamma_beta_ratio", self.gamma_beta_ratio, 0)
        check_number("preference.sft_weight", self.sft_weight, 0)
        check_number("preference.desirable_weight", self.desirable_weight, 0)
        check_number("preference.undesirable_weight", self.undesirable_weight, 0)
        if not isinstance(self.precompute_reference, bool):
            raise ConfigError(f"preference.precompute_reference must be true or false, got {self.precompute_reference!r}")


@dataclass
class GRPOConfig:
    """GRPO (DeepSeekMath; TRL's GRPOTrainer): per prompt a group of completions sampled with the current
    adapter by loratune's engine, scored by reward functions, trained on group-relative advantages."""

    group_size: int = 4
    """Completions sampled per prompt (TRL's num_generations); at least 2, or no advantage is defined."""
    max_new_tokens: int = 32
    """The longest completion (TRL's max_completion_length)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Sampling of the rollouts (top_k 0: off). Each completion's generator is seeded from (seed, step, prompt,
    completion), so a resumed run samples what the uninterrupted one did."""
    beta: float = 0.0
    """The weight of the KL to the reference (adapter off), k3 estimator per token; 0 (TRL's default) skips the
    reference forward."""
    epsilon: float = 0.2
    """The clip range of the policy ratio below 1 (and above, unless epsilon_high is set)."""
    epsilon_high: float | None = None
    """The upper clip range (DAPO's clip-higher); None: epsilon."""
    loss_type: str = "dapo"
    """How per-token losses are averaged: 'grpo' (per sequence, then over sequences), 'bnpo' (over the batch's
    tokens), 'dr_grpo' (over batch x max_new_tokens), 'dapo' (over the global batch's tokens; TRL's default)."""
    scale_rewards: str = "group"
    """Advantages divided by the rewards' std over the 'group', the 'batch', or 'none' (Dr. GRPO)."""
    rewards: list[dict[str, Any]] = field(default_factory=list)
    """The reward functions, summed with their weights, e.g. [{type: exact, field: answer}, {type: length,
    max_words: 20}, {type: function, function: my_rewards:score, weight: 0.5}]; see train/rewards.py."""
    prompt_field: str = "prompt"
    """The record field holding the prompt (text, or a conversation rendered with the chat template)."""

    def __post_init__(self) -> None:
        for name in ("group_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"grpo.{name} must be a positive integer, got {value!r}")
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2: a group of {self.group_size} completion has no "
                              "relative advantage (every advantage would be 0)")
        check_number("grpo.temperature", self.temperature, 0, low_open=True)
        check_number("grpo.top_p", self.top_p, 0, 1, low_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"grpo.top_k must be a non-negative integer (0: off), got {self.top_k!r}")
        check_number("grpo.beta", self.beta, 0)
        check_number("grpo.epsilon", self.epsilon, 0, 1, low_open=True)
        if self.epsilon_high is not None:
            check_number("grpo.epsilon_high", self.epsilon_high, 0, low_open=True)
        if self.loss_type not in GRPO_LOSSES:
            raise ConfigError(f"grpo.loss_type must be one of {', '.join(GRPO_LOSSES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"grpo.scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got "
                              f"{self.scale_rewards!r}")
        if not isinstance(self.rewards, list) or not all(isinstance(r, dict) for r in self.rewards):
            raise ConfigError(f"grpo.rewards must be a list of mappings such as {{type: exact, field: answer}}, got "
                              f"{self.rewards!r}")
