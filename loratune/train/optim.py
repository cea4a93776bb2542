"""AdamW and the learning-rate schedule.

Weights stored in bf16 lose small updates: bf16 keeps 8 significant bits, so ``w + lr * u``
rounds back to ``w`` whenever the update is below ~1/256 of the weight (at lr 5e-5 almost
always). :class:`KahanAdamW` keeps each low-precision weight's rounding error in a
compensation buffer of the weight's dtype and adds it back on the next update (Kahan
summation, as torchdistx's AnyPrecisionAdamW does), with the moments in float32. For float32
parameters it computes what ``torch.optim.AdamW`` computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with float32 moments and Kahan-compensated low-precision weights."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if p.dtype != torch.float32:
                state["compensation"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        u = p.grad.to(torch.float32, copy=True)  # one work tensor (never the gradient itself): gradient, then
        # denominator, then the update
        m.lerp_(u, 1 - beta1)
        v.mul_(beta2).addcmul_(u, u, value=1 - beta2)
        torch.sqrt(v, out=u).div_(math.sqrt(1 - beta2 ** t)).add_(eps)
        torch.div(m, u, out=u).mul_(-lr / (1 - beta1 ** t))  # the Adam step
        if wd:
            u.add_(p, alpha=-lr * wd)  # decoupled weight decay, on the weight before this step
        comp = state.get("compensation")
        if comp is None:
            p.add_(u)
            return
        u.add_(comp)  # plus what earlier roundings lost
        w = p.float().add_(u)  # the exact new weight
        p.copy_(w)  # rounded to the weight's dtype
        comp.copy_(w.sub_(p))  # what this rounding lost


def make_optimizer(model: nn.Module, recipe) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (biases and norms are 1-D).

    torch's AdamW where every trainable parameter is float32 (LoRA masters, fp32 and bf16-mixed runs);
    :class:`KahanAdamW` where some are stored in low precision (full fine-tuning in bf16-true).
    With ``recipe.lora.plus_ratio`` set, LoRA+ groups (see :func:`loraplus_groups`).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    ratio = getattr(getattr(recipe, "lora", None), "plus_ratio", None)
    if ratio is not None:
        groups = loraplus_groups(named, recipe.lr, ratio, recipe.weight_decay)
    else:
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": recipe.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
    if any(p.dtype != torch.float32 for p in params):
        return KahanAdamW(groups, lr=recipe.lr, betas=recipe.adam_betas, eps=recipe.adam_eps)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.adam_betas, eps=recipe.adam_eps)


def loraplus_groups(named: list[tuple[str, nn.Parameter]], lr: float, ratio: float,
                    weight_decay: float) -> list[dict]:
    """LoRA+ (Hayou et al., 2024): B matrices learn ``ratio`` times faster than A.

    The grouping of PEFT's ``create_loraplus_optimizer`` (and the paper's code): A and other
    matrices at ``lr``; LoRA B matrices (a ``.lora_B.`` in the name) at ``ratio * lr``; every 1-D
    parameter (biases, an adapter variant's magnitude) also at ``ratio * lr``, as PEFT does. Weight decay keeps
    this module's rule, matrices only: PEFT's ``groupB_no_decay`` holds biases and LayerNorm
    weights, but it does decay other 1-D parameters (RMSNorm weights, a variant's magnitude), which
    here are not decayed. PEFT's embedding group does not arise (no LoRA on embeddings here).
    Each group carries its own ``lr``, which the LambdaLR schedule multiplies, so warm-up and
    decay keep the ratio. Empty groups are left out.
    """
    if not any(".lora_B." in n for n, _ in named):
        raise ConfigError("lora.plus_ratio is set but no trainable parameter is a LoRA B matrix: LoRA+ applies to "
                          "finetune: lora; unset lora.plus_ratio for full fine-tuning")
    a = [p for n, p in named if p.dim() >= 2 and ".lora_B." not in n]
    b = [p for n, p in named if p.dim() >= 2 and ".lora_B." in n]
    b_no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": a, "weight_decay": weight_decay, "lr": lr},
              {"params": b, "weight_decay": weight_decay, "lr": lr * ratio},
              {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * ratio}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The multiplier of the peak lr at ``step`` (0-based), as transformers' schedules compute it:
    linear warm-up from 0 (step / warmup), then constant, linear to 0, or cosine to 0."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, recipe, total_steps: int):
    """A LambdaLR following :func:`lr_factor` with the recipe's warm-up and schedule."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, recipe.warmup_steps, total_steps, recipe.schedule))
