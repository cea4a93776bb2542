"""Per-token log-probabilities of given completions: what the preference objectives and GRPO score.

``labels`` are aligned as in the rest of training (already shifted: position t of ``labels`` is the
token that position t of ``input_ids`` predicts, -100 where nothing is scored: the prompt and the
padding). The logits are computed in float32 from the model's last hidden states and its head
(with the family's final soft-capping, Gemma's), as transformers computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.examples import IGNORE_INDEX


@dataclass
class TokenLogps:
    """Log-probabilities of the scored tokens of each row."""

    logps: torch.Tensor
    """(B, T) float32: log p(labels[t] | input_ids[:t+1]) where scored, 0 elsewhere."""
    mask: torch.Tensor
    """(B, T) bool: which positions are scored (labels != -100)."""
    logit_sums: torch.Tensor
    """(B,) float32, no gradient: the sum of every vocabulary logit over the scored positions (TRL logs
    their mean as ``logits/chosen``)."""

    def sums(self) -> torch.Tensor:
        """(B,) the summed log-probability of each row's scored tokens."""
        return self.logps.sum(-1)

    def counts(self) -> torch.Tensor:
        """(B,) how many tokens each row scores."""
        return self.mask.sum(-1)

    def means(self) -> torch.Tensor:
        """(B,) the mean log-probability per scored token (0 for a row that scores none)."""
        return self.sums() / self.counts().clamp(min=1)


def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> TokenLogps:
    """The scored tokens' log-probabilities under ``model`` (one forward of the (B, T) rows)."""
    hidden = model.hidden_states(input_ids) if position_ids is None else \
        model.hidden_states(input_ids, position_ids=position_ids)  # (B, T, C)
    logits = F.linear(hidden, model.lm_head.weight).float()  # (B, T, V)
    softcap = getattr(model, "logit_softcap", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    with torch.no_grad():
        logit_sums = (logits.sum(-1) * mask).sum(-1)
    return TokenLogps(picked * mask, mask, logit_sums)
