"""Frozen linear layers whose weight is stored quantized: NF4 (QLoRA's base layer) here, int8 in
:mod:`.int8`, both on :class:`QuantizedLinear`.

The weight is dequantized for each product and dropped right after: the autograd function below
saves nothing for backward and dequantizes again there to compute the input gradient
(``grad_x = grad_out @ W``). A frozen base needs no weight gradient, so the only full-size
tensor a step ever holds for this layer is the transient dequantized weight, not a saved one
per layer: that, with 4-bit storage, is QLoRA's memory saving.

The products are ``F.linear`` / ``torch.matmul`` on the weight dequantized to the input's dtype,
as bitsandbytes' ``Linear4bit`` computes them, so NF4Linear's outputs and input gradients equal its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .nf4 import NF4Weight, bits_per_param, dequantize_nf4, quantize_nf4


class _FrozenMatmul(torch.autograd.Function):
    """``F.linear(x, dequantize(x.dtype), bias)`` that keeps no dequantized weight for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, dequantize: Callable) -> torch.Tensor:
        ctx.dequantize = dequantize  # reads the packed storage (held by its owner anyway); nothing full-size saved
        ctx.bias_dtype = None if bias is None else bias.dtype
        w = dequantize(x.dtype)  # (out, in), freed when forward returns
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_out, ctx.dequantize(grad_out.dtype))  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def frozen_linear(x: torch.Tensor, dequantize: Callable[[torch.dtype], torch.Tensor],
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with ``W = dequantize(dtype)`` (out, in) rebuilt for the forward product and again
    for the input gradient; differentiable in ``x`` and ``bias``, never in the weight."""
    return _FrozenMatmul.apply(x, bias, dequantize)


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for an NF4 weight ``q`` of shape (out, in), in ``x``'s dtype; differentiable in
    ``x`` (and ``bias``), never in the weight. For layers that hold an NF4 base of their own."""
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ConfigError(f"nf4_linear: input of width {x.shape[-1]} does not fit a weight of shape {q.shape}")
    return frozen_linear(x, functools.partial(dequantize_nf4, q), bias)


class QuantizedLinear(nn.Module):
    """What every quantized frozen linear shares: buffers only (no parameters), a forward that dequantizes
    on the fly (:func:`frozen_linear`), and dtype casts that reach the bias but never the stored format.

    A subclass stores its weight in the buffers named by ``quant_buffers`` and implements
    :meth:`dequantized_weight`.
    """

    is_quantized = True
    """Marks a quantized base for the LoRA layer, which wraps it instead of reading a ``weight``."""
    quant_buffers: tuple[str, ...] = ()
    in_features: int
    out_features: int

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in ``dtype``, for merging, a variant's row norms, or export."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self._buffers[self.quant_buffers[0]].device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"{type(self).__name__}: input of width {x.shape[-1]}, expected {self.in_features}")
        return frozen_linear(x, self.dequantized_weight, self.bias)  # (..., in) -> (..., out)

    def _apply(self, fn, recurse: bool = True):
        kept = {name: self._buffers[name] for name in self.quant_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():  # a dtype cast would round the fp32 scales: move them, never cast
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


class NF4Linear(QuantizedLinear):
    """A frozen ``nn.Linear`` stored in NF4: packed codes and block scales as buffers (they move with
    ``.to(device)`` and are saved by ``state_dict()``), an optional frozen bias buffer, no parameters.

    Build one from a float weight with :meth:`from_weight`; the constructor makes zero storage of the
    right sizes, for loading a state dict into. A dtype cast of the module (``.to(torch.bfloat16)``)
    casts the bias only: the quantization state keeps its format.
    """

    quant_buffers = ("weight_data", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 64,
                 double_quant: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block_size, self.weight_dtype = block_size, dtype
        self._store(NF4Weight.empty((self.out_features, self.in_features), block_size, double_quant, dtype, device))
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, block_size: int = 64,
                    double_quant: bool = True, transposed: bool = False) -> NF4Linear:
        """Quantize a float weight (out, in) -- or (in, out) with ``transposed``, transformers' Conv1D
        layout -- and keep ``bias`` (out,) as it is, frozen."""
        if weight.dim() != 2:
            raise ConfigError(f"NF4Linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        w = weight.detach().t() if transposed else weight.detach()  # (out, in)
        if bias is not None and tuple(bias.shape) != (w.shape[0],):
            raise ConfigError(f"bias of shape {tuple(bias.shape)} does not fit a weight with {w.shape[0]} outputs")
        q = quantize_nf4(w.contiguous(), block_size, double_quant)
        module = cls(w.shape[1], w.shape[0], bias=False, block_size=block_size, double_quant=double_quant,
                     dtype=w.dtype, device=w.device)
        module._store(q)
        module.bias = None if bias is None else bias.detach().clone()
        return module

    def _store(self, q: NF4Weight) -> None:
        for name, t in zip(self.quant_buffers, (q.data, q.absmax, q.absmax_scale, q.absmax_offset)):
            self.register_buffer(name, t)

    @property
    def nf4(self) -> NF4Weight:
        """The weight as an :class:`NF4Weight` over this module's buffers (no copy)."""
        return NF4Weight(self.weight_data, self.weight_absmax, (self.out_features, self.in_features),
                         self.weight_dtype, self.block_size, self.weight_absmax_scale, self.weight_absmax_offset)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per weight value (bias not counted): ~4.127 with double quantization at block 64."""
        return bits_per_param(self.nf4)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in ``dtype``, for merging, a variant's row norms, or export."""
        return dequantize_nf4(self.nf4, dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_absmax_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block_size={self.block_size}{dq}")
