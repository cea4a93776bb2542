"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT defines it.

The adapted weight is ``m * V / ||V||`` with ``V = W + scale*BA`` and one trainable magnitude
``m`` per output row, initialised to ``||W||`` so a fresh adapter changes nothing. In forward the
norm is *detached* (the paper's section 4.3, PEFT's ``weight_norm.detach()``): it follows the
update but gets no gradient. The layer's output is then the base output rescaled plus the
rescaled LoRA output, so the full adapted weight is never built:

    y = (m/||V|| - 1) * (x W^T) + m/||V|| * scale * B A x  (+ the base output, added by the caller)

All of DoRA is here: :class:`DoRAUpdate` is the variant (see :mod:`.update` for the seam) that the
layer, the PEFT format and the serving banks call; the functions below are its math.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .update import LoRAUpdate


class DoRAUpdate(LoRAUpdate):
    """A LoRA update plus DoRA's trainable magnitude per output row (``lora_magnitude``, set from the base
    weight by :meth:`start`, so a fresh adapter changes nothing)."""

    variant: ClassVar[str] = "dora"
    title: ClassVar[str] = "DoRA"
    peft_flag: ClassVar[str | None] = "use_dora"
    peft_extra: ClassVar[dict[str, str]] = {"lora_magnitude_vector": "lora_magnitude"}
    peft_extra_named: ClassVar[str] = "a DoRA magnitude"
    save_note: ClassVar[str | None] = ("vLLM (and other servers that batch LoRA adapters) cannot serve DoRA "
                                       "adapters; merge it (loratune merge) to serve it there")
    fingerprint_key: ClassVar[str | None] = "dora_base_norms"
    combine_refusal: ClassVar[str | None] = ("its magnitudes do not add up like LoRA updates, so it cannot be "
                                             "combined (as in PEFT); merge it into the base instead")

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, slices: dict[str, tuple[int, int]] | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, r, alpha, dropout, rslora, slices, device)
        self.lora_magnitude = nn.Parameter(torch.ones(out_features, device=device, dtype=torch.float32))

    @property
    def use_dora(self) -> bool:
        return True

    def trainable(self) -> list[nn.Parameter]:
        return [*super().trainable(), self.lora_magnitude]

    def start(self, layer: Any) -> None:
        init_magnitude(self, layer.base_weight())

    def added(self, layer: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        dtype = out.dtype
        dropped = layer.training and not isinstance(self.dropout, nn.Identity)
        bias = layer.base_bias()
        base = None if dropped else (out if bias is None else out - bias.to(dtype))
        return dora_extra(self, self.dropout(x), base, layer.base_weight(dtype), dtype)

    def finite(self, delta: torch.Tensor) -> bool:
        return super().finite(delta) and bool(torch.isfinite(self.lora_magnitude).all())

    def merged_weight(self, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return merged_weight(self, weight)

    def unmerged_weight(self, weight: torch.Tensor, undo: Any) -> torch.Tensor:
        return weight / undo.to(weight.device) - self.delta_weight().to(weight.device)

    @torch.no_grad()
    def bank_scale(self, layer: Any) -> torch.Tensor | None:
        """g = m / ||W + s B A|| per output row: a constant at inference (PEFT's DoRA forward, dropout off)."""
        a, b = self.stacked_A().float(), self.stacked_B().float()
        return self.lora_magnitude.float() / row_norms(layer.base_weight(), b @ a)

    def load_peft_extra(self, tensors: dict[str, torch.Tensor], module: str) -> None:
        magnitude = tensors["lora_magnitude_vector"]
        if tuple(magnitude.shape) != (self.out_features,):
            raise CheckpointError(f"the DoRA magnitude for {module} has shape {tuple(magnitude.shape)}; this model's "
                                  f"layer has {self.out_features} outputs: load it onto the model it was trained on")
        self.lora_magnitude = nn.Parameter(magnitude.float().to(self.lora_magnitude.device))

    def base_fingerprint(self, weight: torch.Tensor) -> list[float] | None:
        return norm_fingerprint(weight)

    def base_fit(self, weight: torch.Tensor, saved: list[float] | None) -> tuple[float, str, float] | None:
        """Ours carry a fingerprint of the base's row norms (1% tolerance: a bf16 copy of the same weights
        passes); for others the magnitudes must be within 25% of the rows' norms (median; training keeps them
        close, see :func:`magnitude_fit`). DoRA rescales every row to its trained magnitude, so on other
        weights it distorts the model."""
        if saved is not None:
            return fingerprint_gap(saved, weight), "row norms differ from the base it was saved with by", 0.01
        return magnitude_fit(self, weight), "magnitudes differ from this base's row norms by", 0.25


def row_norms(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta|| per output row, (out,), from (out, in) tensors (PEFT's ``get_weight_norm``)."""
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)


@torch.no_grad()
def init_magnitude(update: LoRAUpdate, weight: torch.Tensor) -> None:
    """m = ||W + scale*BA|| per row (= ||W|| while B is zero): the adapter starts as the identity."""
    w = weight.float()
    update.lora_magnitude.copy_(row_norms(w, update.delta_weight().to(w.device)))


def dora_extra(update: LoRAUpdate, x: torch.Tensor, base_no_bias: torch.Tensor | None, weight: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """What DoRA adds to the base output, (..., out).

    ``x`` is the layer input after the adapter's dropout; ``base_no_bias`` the base output without
    its bias when dropout is off (PEFT reuses it then), else None and it is recomputed from the
    dropped-out input, as PEFT does. ``weight`` is the dequantized (out, in) base weight.
    """
    a, b = update.stacked_A().to(dtype), update.stacked_B(scaled=False).to(dtype)
    w = weight.to(dtype)
    norm = row_norms(w, update.scale * (b @ a).detach()).detach()  # (out,): the paper's detached norm
    mag_scale = (update.lora_magnitude / norm).view(1, -1)  # (1, out)
    lora = F.linear(F.linear(x.to(dtype), a), b)  # (..., out), unscaled
    if base_no_bias is None:
        base_no_bias = F.linear(x.to(dtype), w)
    return ((mag_scale - 1) * base_no_bias + mag_scale * lora * update.scale).to(dtype)


@torch.no_grad()
def merged_weight(update: LoRAUpdate, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m/||W + ΔW|| * (W + ΔW), the factor m/||W + ΔW||) in float32: DoRA folded into a plain weight.
    The factor is kept to unmerge (W = W' / factor - ΔW), as PEFT caches it."""
    w, delta = weight.float(), update.delta_weight().to(weight.device)
    factor = (update.lora_magnitude.float() / row_norms(w, delta)).view(-1, 1)  # (out, 1)
    return factor * (w + delta), factor


def norm_fingerprint(weight: torch.Tensor) -> list[float]:
    """A few numbers that pin the base a DoRA adapter was trained on: the mean and spread of W's row
    norms and the first eight of them (saved with the adapter, compared on load)."""
    norms = torch.linalg.norm(weight.float(), dim=1)
    return [float(norms.mean()), float(norms.std()), *(float(v) for v in norms[:8])]


def fingerprint_gap(saved: list[float], weight: torch.Tensor) -> float:
    """Largest relative difference between a saved fingerprint and this weight's."""
    now = norm_fingerprint(weight)
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(saved, now)) if len(saved) == len(now) else 1.0


def magnitude_fit(update: LoRAUpdate, weight: torch.Tensor) -> float:
    """Median |m / ||W + ΔW|| - 1| over rows: near 0 for the base the adapter was trained on
    (training moves m and ΔW together), large for another base."""
    with torch.no_grad():
        norms = row_norms(weight.float(), update.delta_weight().to(weight.device))
        return float((update.lora_magnitude.float() / norms - 1).abs().median())
