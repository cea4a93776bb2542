"""One adapter's update of one layer: ``scale * B A`` per output slice, and DoRA's magnitude.

A :class:`~.lora.LoRALinear` holds one :class:`LoRAUpdate` per named adapter (``default``,
or the names given when loading several), the way PEFT keeps ``lora_A[adapter_name]``. The
update knows its own rank, scale, slices and dropout, so adapters of different ranks and
targets live side by side on one frozen base.

DoRA (Liu et al., 2024) writes the adapted weight as ``m * (W + scale*BA) / ||W + scale*BA||``
with one trainable magnitude per output row; PEFT's definition is followed exactly, including
the detached norm (the paper's section 4.3), see :mod:`.dora`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

WHOLE = "all"  # slice name used when the whole projection is adapted

log = logging.getLogger(__name__)


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRAUpdate(nn.Module):
    """The trainable part of one adapter on one layer.

    Args:
        in_features, out_features: the adapted projection's shape.
        r, alpha, dropout, rslora: see :class:`~.lora.LoRAConfig`.
        slices: output slices to adapt, ``{name: (start, stop)}``; None adapts the whole output.
        use_dora: add DoRA's magnitude vector (set from the base weight by :meth:`init_magnitude`).
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, slices: dict[str, tuple[int, int]] | None = None, use_dora: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = lora_scale(r, alpha, rslora)
        self.slices = {n: tuple(v) for n, v in slices.items()} if slices else {WHOLE: (0, out_features)}
        limit, narrowest = rank_limit(in_features, self.slices)
        if r > limit:  # PEFT allows it, so loaded adapters may have it; new ones are refused in inject_lora
            log.warning(f"LoRA rank {r} exceeds min(in, out) = {limit} of this layer{_slice_text(narrowest)}: "
                        "the update is not low-rank")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=device, dtype=torch.float32)
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(r, in_features, **factory)) for n in self.slices})
        self.lora_B = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(stop - start, r, **factory)) for n, (start, stop) in self.slices.items()})
        self.lora_magnitude = nn.Parameter(torch.ones(out_features, **factory)) if use_dora else None
        self.reset_parameters()

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude is not None

    def reset_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT do; B = 0 so the update starts at zero."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, slices={','.join(self.slices)}"
                + (", dora" if self.use_dora else ""))

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

    def peft_alpha(self) -> float:
        """lora_alpha of the equivalent whole-projection PEFT adapter (rank S*r, the same scale)."""
        s = len(self.slices)
        return self.alpha * (math.sqrt(s) if self.rslora else s)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The full update scale * B A in float32, shaped like the (out, in) weight."""
        return self.stacked_B().float() @ self.stacked_A().float()

    def lora_out(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """scale * B A x in ``dtype`` (low-precision activations run the update in their dtype; the float32
        masters get their gradients through the cast)."""
        z = F.linear(x.to(dtype), self.stacked_A().to(dtype))  # (..., in) -> (..., S*r)
        return F.linear(z, self.stacked_B().to(dtype))  # (..., S*r) -> (..., out)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters this adapter trains (A, B and DoRA's magnitude)."""
        extra = [self.lora_magnitude] if self.use_dora else []
        return [*self.lora_A.values(), *self.lora_B.values(), *extra]


def rank_limit(in_features: int, slices: dict[str, tuple[int, int]]) -> tuple[int, str]:
    """The highest rank that is still low-rank for a layer: (min(in, out) of its narrowest slice, its name).

    Why: B A with r >= min(in, out) can already express any update of that slice; a larger r
    only adds parameters and memory, and hides a mistyped rank.
    """
    return min((min(in_features, stop - start), name) for name, (start, stop) in slices.items())


def _slice_text(name: str) -> str:
    return "" if name == WHOLE else f" (slice {name})"
