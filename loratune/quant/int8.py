"""Int8 weight-only storage for a frozen base: one symmetric scale per output row, as torchao's
``Int8WeightOnlyConfig`` computes it (``scale = absmax / 127.5`` in the weight's dtype, then fp32;
``q = clamp(round(w * (1 / scale)), -128, 127)``, round half to even, so the row's largest value clips
half a step). 8 bits plus 32 per row: about twice NF4's storage for an order of magnitude less RMS
error on Gaussian weights. Dequantized on the fly like :class:`~.linear.NF4Linear`.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .linear import QuantizedLinear
from .nf4 import _check_weight


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 (out, in), scale fp32 (out,))`` of a 2-D weight, equal to torchao's int8 weight-only."""
    _check_weight(w, "int8")
    if w.dim() != 2:
        raise ConfigError(f"int8 weight-only quantization takes a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach()
    scale = (w.abs().amax(dim=1) / 127.5).float().clamp(min=torch.finfo(torch.float32).eps)  # (out,)
    codes = torch.round(w.float() * (1.0 / scale)[:, None]).clamp(-128, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight ``codes x scale`` in ``dtype`` (computed in fp32, rounded once)."""
    return (codes.float() * scale[:, None]).to(dtype)


class Int8Linear(QuantizedLinear):
    """A frozen linear layer stored as int8 codes + per-row fp32 scales (buffers), optional frozen bias."""

    quant_buffers = ("weight_int8", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    transposed: bool = False) -> Int8Linear:
        """Quantize a float weight (out, in), or (in, out) with ``transposed``; keep ``bias`` as it is."""
        w = weight.detach().t() if transposed else weight.detach()
        codes, scale = quantize_int8(w)
        module = cls(w.shape[1], w.shape[0], bias=False, device=w.device)
        module.weight_int8, module.weight_scale = codes, scale
        module.bias = None if bias is None else bias.detach().clone()
        return module

    @property
    def bits_per_param(self) -> float:
        """8 bits per value plus a 32-bit scale per row of ``in_features`` values."""
        return 8 + 32 / self.in_features

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
