"""One adapter's update of one layer: ``scale * B A`` per output slice; the plain LoRA *variant*.

A :class:`~.lora.LoRALinear` holds one :class:`LoRAUpdate` per named adapter (``default``,
or the names given when loading several), the way PEFT keeps ``lora_A[adapter_name]``. The
update knows its own rank, scale, slices and dropout, so adapters of different ranks and
targets live side by side on one frozen base.

:class:`LoRAUpdate` is also the variant seam (PEFT's ``LoraVariant``): whatever a method changes
about LoRA (what forward adds, how it merges and unmerges, its scale in a serving bank, its extra
PEFT tensors and config flag) is a method or class attribute here, which a variant overrides in
its own file (DoRA: :mod:`.dora`) and names in :mod:`.variants`. The layer, the PEFT format and
the serving banks call these and never test which variant they hold.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

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
    """

    variant: ClassVar[str] = "lora"
    """The name in :data:`~.variants.VARIANTS`."""
    title: ClassVar[str] = "LoRA"
    """How messages name the method."""
    peft_flag: ClassVar[str | None] = None
    """The adapter_config.json key (and :class:`~.lora.LoRAConfig` field) that is true for this variant."""
    peft_extra: ClassVar[dict[str, str]] = {}
    """Extra PEFT tensors: the key suffix after the module name (``lora_magnitude_vector``) -> our parameter."""
    peft_extra_named: ClassVar[str] = ""
    """The extra tensor in messages (``a DoRA magnitude``)."""
    save_note: ClassVar[str | None] = None
    """A warning logged when such an adapter is saved (who cannot read it)."""
    fingerprint_key: ClassVar[str | None] = None
    """loratune_adapter.json key holding :meth:`base_fingerprint` per module (None: nothing to record)."""
    combine_refusal: ClassVar[str | None] = None
    """Why adapters of this variant cannot be combined (None: they can)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, slices: dict[str, tuple[int, int]] | None = None,
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT do; B = 0 so the update starts at zero."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, slices={','.join(self.slices)}"
                + (f", {self.variant}" if self.variant != LoRAUpdate.variant else ""))

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
        """The parameters this adapter trains (A and B; a variant adds its own)."""
        return [*self.lora_A.values(), *self.lora_B.values()]

    # ------------------------------------------------------------------ the variant seam
    def start(self, layer: Any) -> None:
        """Fit the variant's own state to ``layer``'s base weight once A and B hold their start (nothing here)."""

    def added(self, layer: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to ``layer``'s output ``out`` (the base's, plus the adapters before it) for
        input ``x``, in ``out``'s dtype."""
        return self.lora_out(self.dropout(x), out.dtype)

    def finite(self, delta: torch.Tensor) -> bool:
        """Whether merging is safe: the update ``delta`` (:meth:`delta_weight`) and any own state are finite."""
        return bool(torch.isfinite(delta).all())

    def merged_weight(self, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(the float32 weight with this update folded in, what :meth:`unmerged_weight` needs to undo it)."""
        return weight + delta.to(weight.device), None

    def unmerged_weight(self, weight: torch.Tensor, undo: Any) -> torch.Tensor:
        """The weight before :meth:`merged_weight` (up to rounding), from the merged one and its ``undo``."""
        return weight - self.delta_weight().to(weight.device)

    def bank_scale(self, layer: Any) -> torch.Tensor | None:
        """Per output row, the constant an inference-only bank multiplies the layer's output by (the base's
        and the update's: ``base + (g - 1) * W x + g * s B A x``); None: 1, a plain update."""
        return None

    def peft_extra_tensors(self) -> dict[str, torch.Tensor]:
        """Extra PEFT tensors by key suffix (:attr:`peft_extra`), float32 on the CPU."""
        return {suffix: getattr(self, attr).detach().float().contiguous().cpu()
                for suffix, attr in self.peft_extra.items()}

    def load_peft_extra(self, tensors: dict[str, torch.Tensor], module: str) -> None:
        """Take the extra PEFT tensors read for ``module`` (checked against this layer's shape)."""

    def base_fingerprint(self, weight: torch.Tensor) -> list[float] | None:
        """A few numbers that pin the base this adapter was trained on, saved under :attr:`fingerprint_key`."""
        return None

    def base_fit(self, weight: torch.Tensor, saved: list[float] | None) -> tuple[float, str, float] | None:
        """(gap, what differs, tolerance) between this adapter and the base ``weight`` it is loaded onto, for a
        variant that distorts a model it does not fit; None: any base fits."""
        return None


def rank_limit(in_features: int, slices: dict[str, tuple[int, int]]) -> tuple[int, str]:
    """The highest rank that is still low-rank for a layer: (min(in, out) of its narrowest slice, its name).

    Why: B A with r >= min(in, out) can already express any update of that slice; a larger r
    only adds parameters and memory, and hides a mistyped rank.
    """
    return min((min(in_features, stop - start), name) for name, (start, stop) in slices.items())


def _slice_text(name: str) -> str:
    return "" if name == WHOLE else f" (slice {name})"
