"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT defines it.

The adapted weight is ``m * V / ||V||`` with ``V = W + scale*BA`` and one trainable magnitude
``m`` per output row, initialised to ``||W||`` so a fresh adapter changes nothing. In forward the
norm is *detached* (the paper's section 4.3, PEFT's ``weight_norm.detach()``): it follows the
update but gets no gradient. The layer's output is then the base output rescaled plus the
rescaled LoRA output, so the full adapted weight is never built:

    y = (m/||V|| - 1) * (x W^T) + m/||V|| * scale * B A x  (+ the base output, added by the caller)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .update import LoRAUpdate


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
