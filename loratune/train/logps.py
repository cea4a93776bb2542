"""Per-token log-probabilities of given completions: what the preference objectives and GRPO score.

``labels`` are aligned as in the rest of training (already shifted: position t of ``labels`` is the
token that position t of ``input_ids`` predicts, -100 where nothing is scored: the prompt and the
padding). The logits are computed in float32 from the model's last hidden states and its head
(with the family's final soft-capping, Gemma's), as transformers computes them.

The reference model of the preference objectives is the same model with its adapters switched off
(:func:`reference_sums`), computed in each step's pass or once before training
(:func:`precompute_reference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.lora import adapters_disabled, lora_layers
from ..data import Batches
from ..data.batches import collate
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
    entropy_sums: torch.Tensor | None = None
    """(B,) float32, no gradient: the summed entropy of the next-token distribution over the scored positions
    (TRL's ``entropy``)."""
    top1: torch.Tensor | None = None
    """(B,) no gradient: how many scored tokens are the model's argmax (TRL's ``mean_token_accuracy``)."""
    vocab: int = 0
    """The vocabulary size (the logits' last dim), to turn :attr:`logit_sums` into TRL's per-token mean logit."""
    all_logit_sums: torch.Tensor | None = None
    """(B,) float32, no gradient: the sum of every logit at every position, scored or not (what TRL's ORPO
    and CPO trainers average for ``logits/chosen``)."""

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
                position_ids: torch.Tensor | None = None, stats: bool = True, temperature: float = 1.0) -> TokenLogps:
    """The scored tokens' log-probabilities under ``model`` (one forward of the (B, T) rows); ``stats`` False
    skips what only metrics need (the entropy, the argmax, the logit sums over every position: e.g. for the
    reference's pass). ``temperature``: of the distribution scored (GRPO scores what it sampled from, as TRL:
    the soft-capped logits divided by it)."""
    hidden = model.hidden_states(input_ids) if position_ids is None else \
        model.hidden_states(input_ids, position_ids=position_ids)  # (B, T, C)
    logits = F.linear(hidden, model.lm_head.weight).float()  # (B, T, V)
    softcap = getattr(model, "logit_softcap", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    with torch.no_grad():
        vocab_sums = logits.sum(-1)  # (B, T)
        logit_sums = (vocab_sums * mask).sum(-1)
        if not stats:
            return TokenLogps(picked * mask, mask, logit_sums, vocab=logits.shape[-1])
        entropy = torch.stack([_entropy(row) for row in logits.detach()])  # a row at a time: one (T, V) extra
        top1 = ((logits.argmax(-1) == safe) & mask).sum(-1)
    return TokenLogps(picked * mask, mask, logit_sums, (entropy * mask).sum(-1), top1, logits.shape[-1],
                      vocab_sums.sum(-1))


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """(T, V) -> (T,) the entropy of each position's next-token distribution."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (whose base, adapters off, is the reference model)."""
    return next(lora_layers(model), None) is not None


def reference_sums(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) the summed log-probabilities of the rows' scored tokens under the reference: ``model`` with its
    adapters switched off, without gradients (the same weights, so no second copy of the model)."""
    with torch.no_grad(), adapters_disabled(model):
        return token_logps(model, input_ids, labels, stats=False).sums()


@torch.no_grad()
def precompute_reference(model: nn.Module, batches: Batches, size: int, device: torch.device,
                         second_row: bool = True) -> None:
    """Set ``item.ref_logps`` = (row 0, row 1) reference log-probs on every item of ``batches`` (pairs: chosen
    and rejected; KTO: the completion and its KL row), computed ``size`` items at a time as the batches
    collate them, so that a batch then carries them as its ``ref_logps`` (B, 2). ``second_row`` False
    leaves row 1's NaN (KTO's KL row depends on the batch an item is drawn in, so it cannot be precomputed)."""
    items = batches.examples
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        batch = collate(chunk, batches.pad_id)
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)  # (b, 2, T)
        if not second_row:
            x, y = x[:, :1], y[:, :1]
        sums = reference_sums(model, x.flatten(0, 1), y.flatten(0, 1)).view(len(chunk), -1).float().cpu()
        for item, row in zip(chunk, sums.tolist()):
            item.ref_logps = (row[0], row[1] if second_row else math.nan)
