"""The LoRA layer: a frozen linear weight plus a trainable low-rank update.

``out = x W^T + b + scale * B(A(dropout(x)))`` with ``A`` (r x in) Kaiming-uniform and ``B``
(out x r) zero, so a freshly injected adapter leaves the model's output unchanged.

The layer *owns* the frozen ``weight`` and ``bias`` under their original names (the torchtune
way), so a base checkpoint loads into an adapted model without key surgery. One layer can
adapt the whole projection or only some output slices of a fused one (GPT-2's ``c_attn``
holds q, k and v; the tutorial adapts only q and v): each slice gets its own A and B, and
``x A^T`` is computed once for all slices.

Merging is explicit (:meth:`LoRALinear.merge` / :meth:`LoRALinear.unmerge`), computed in
float32 and cast back, and refuses non-finite updates.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MergeError

WHOLE = "all"  # slice name used when the whole projection is adapted

log = logging.getLogger(__name__)


@dataclass
class LoRAConfig:
    """What to adapt and how: rank, scaling, dropout and target names."""

    r: int = 4
    """Rank of the update (the tutorial uses 4)."""
    alpha: float = 32.0
    """Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    """Target names: model aliases (q, k, v, qkv, attn.out, mlp.fc, mlp.proj), module-name
    suffixes, 'all-linear', or 're:<regex>' matched against full module names."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("lora.targets is empty: name at least one target, e.g. ['q', 'v']")

    @property
    def scale(self) -> float:
        """The factor applied to B(A(x))."""
        return lora_scale(self.r, self.alpha, self.rslora)


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen linear projection with LoRA updates on the whole output or on named slices.

    Args:
        weight: the frozen base weight, ``(out, in)``; ``(in, out)`` when ``fan_in_fan_out``
            (GPT-2's Conv1D layout in transformers).
        bias: the frozen base bias or None.
        r, alpha, dropout, rslora: see :class:`LoRAConfig`.
        slices: output slices to adapt, ``{name: (start, stop)}``; None adapts the whole output.
        fan_in_fan_out: whether ``weight`` is stored transposed.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        slices: dict[str, tuple[int, int]] | None = None,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.fan_in_fan_out = fan_in_fan_out
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {r}")
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = lora_scale(r, alpha, rslora)
        self.slices = dict(slices) if slices else {WHOLE: (0, self.out_features)}
        for name, (start, stop) in self.slices.items():
            if not 0 <= start < stop <= self.out_features:
                raise ConfigError(f"LoRA slice {name!r}=({start}, {stop}) is outside 0..{self.out_features}")
        limit, narrowest = rank_limit(self.in_features, self.slices)
        if r > limit:  # PEFT allows it, so loaded adapters may have it; new ones are refused in inject_lora
            log.warning(f"LoRA rank {r} exceeds min(in, out) = {limit} of this layer{_slice_text(narrowest)}: "
                        "the update is not low-rank")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=weight.device, dtype=torch.float32)
        self.lora_A = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(r, self.in_features, **factory)) for n in self.slices}
        )
        self.lora_B = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(stop - start, r, **factory)) for n, (start, stop) in self.slices.items()}
        )
        self.reset_lora_parameters()
        self.merged = False
        self.enabled = True

    @classmethod
    def wrap(cls, base: nn.Module, cfg: LoRAConfig, slices=None, fan_in_fan_out: bool = False) -> "LoRALinear":
        """Build a LoRA layer that takes over ``base``'s weight and bias (no copy)."""
        return cls(base.weight, base.bias, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, slices, fan_in_fan_out)

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT do; B = 0 so the update starts at zero."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    def extra_repr(self) -> str:
        names = ",".join(self.slices)
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"slices={names}, merged={self.merged}")

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        return F.linear(x, w, self.bias)

    def stacked_A(self) -> torch.Tensor:
        """Every slice's A stacked, (S*r, in): one matmul computes x A^T for all slices."""
        names = list(self.slices)
        return self.lora_A[names[0]] if len(names) == 1 else torch.cat([self.lora_A[n] for n in names])

    def stacked_B(self, scaled: bool = True) -> torch.Tensor:
        """scale * B for the whole output, (out, S*r): slice i's B in its rows and columns, zeros elsewhere
        (without the scale when ``scaled`` is False: the block B of the equivalent PEFT adapter).

        Tiny (out x S*r), so building it each step costs nothing, and the update then is two
        plain matmuls with no in-place writes into slices of the output.
        """
        blocks = []
        for name, (start, stop) in self.slices.items():
            b = self.lora_B[name] * self.scale if scaled else self.lora_B[name]  # (stop - start, r)
            if stop - start != self.out_features:
                b = F.pad(b, (0, 0, start, self.out_features - stop))  # zero rows outside the slice
            blocks.append(b)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)  # (..., out)
        if self.merged or not self.enabled:
            return out
        # low-precision activations (bf16 weights or autocast) run the update in their dtype; the
        # float32 masters get their gradients through the cast
        dtype = out.dtype
        z = F.linear(self.dropout(x).to(dtype), self.stacked_A().to(dtype))  # (..., in) -> (..., S*r)
        return out + F.linear(z, self.stacked_B().to(dtype))  # (..., S*r) -> (..., out)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The full update scale * B A in float32, shaped like the (out, in) weight."""
        return self.stacked_B().float() @ self.stacked_A().float()

    @torch.no_grad()
    def _apply_delta(self, sign: float) -> None:
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise MergeError("refusing to merge: the LoRA update contains NaN or Inf values")
        if self.fan_in_fan_out:
            delta = delta.t()
        merged = self.weight.float() + sign * delta
        self.weight.copy_(merged.to(self.weight.dtype))

    def merge(self) -> None:
        """Fold the update into the base weight (float32 math, cast back); forward then skips A and B."""
        if self.merged:
            raise MergeError("adapter is already merged")
        self._apply_delta(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract a merged update again, restoring the base weight up to rounding."""
        if not self.merged:
            raise MergeError("adapter is not merged")
        self._apply_delta(-1.0)
        self.merged = False


def rank_limit(in_features: int, slices: dict[str, tuple[int, int]]) -> tuple[int, str]:
    """The highest rank that is still low-rank for a layer: (min(in, out) of its narrowest slice, its name).

    Why: B A with r >= min(in, out) can already express any update of that slice; a larger r
    only adds parameters and memory, and hides a mistyped rank.
    """
    return min((min(in_features, stop - start), name) for name, (start, stop) in slices.items())


def _slice_text(name: str) -> str:
    return "" if name == WHOLE else f" (slice {name})"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """All LoRA layers of a model with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer into its base weight; returns how many were merged."""
    layers = [m for _, m in lora_layers(model) if not m.merged]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`; returns how many layers were unmerged."""
    layers = [m for _, m in lora_layers(model) if m.merged]
    for m in layers:
        m.unmerge()
    return len(layers)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone for a while (e.g. to compare with and without the adapter).

    Refuses merged adapters, whose update is already inside the weight.
    """
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise MergeError("cannot disable merged adapters: unmerge first")
    previous = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.enabled = was
