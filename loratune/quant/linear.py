"""Frozen linear layers whose weight is stored quantized: NF4 (QLoRA's base layer) here, int8 in
:mod:`.int8`, both on :class:`QuantizedLinear`.

The weight is dequantized for each product and dropped right after: the autograd function below
saves nothing for backward and dequantizes again there to compute the input gradient
(``grad_x = grad_out @ W``). A frozen base needs no weight gradient, so the only full-size
tensor a step ever holds for this layer is the transient dequantized weight, not a saved one
per layer: that, with 4-bit storage, is QLoRA's memory saving.

The products are ``F.linear`` / ``torch.matmul`` on the weight dequantized to the input's dtype,
as bitsandbytes' ``Linear4bit`` computes them, so NF4Linear's outputs and input gradients equal its own.

On CPU an NF4 product whose rows hold whole blocks (every Llama-family projection) is fused instead
(:class:`_NF4TiledMatmul`): the weight is dequantized a tile of ~1 M values at a time into reused
buffers and each tile multiplied at once, while it is in cache. No full-size weight is built, so
nothing is paged in and zeroed per product (a fresh tensor of tens of MiB is, each time, when
glibc's mmap threshold is pinned as training pins it), and the step's peak drops by the largest
dequantized weight. Every tile product keeps the full inner dimension (forward: rows of the
weight; input gradient: its columns), so each output element is still one dot product rounded
once. (Inside ``torch.compile`` the unfused path is traced instead: the reused buffers are state a
graph cannot keep.) On a CPU without native bf16/fp16 matrix instructions (no AVX512-BF16 or AMX: AVX2 machines)
a half-precision product runs as an fp32 GEMM on the same half-precision values (the weight is
rounded to the input's dtype first), rounded once to the input's dtype at the end: what a bf16
GEMM with fp32 accumulation computes, up to summation order, at the fp32 kernel's speed instead of
the emulated bf16 one (several times slower there, and slower still for ``grad @ W``: the NF4
section of docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..runtime.device import cpu_flags
from .nf4 import (
    NF4Weight,
    TileScratch,
    bits_per_param,
    block_absmax,
    dequantize_nf4,
    dequantize_nf4_tile,
    quantize_nf4,
    tiles_by_row_blocks,
)

FUSED_CPU = True
"""Whether NF4 products on CPU use the fused, tiled path (:class:`_NF4TiledMatmul`); False restores
dequantize-then-multiply (the reference the fused path is tested against, and benchmarks' "before")."""
TILE_VALUES = 1 << 20
"""About this many weight values are dequantized per tile of the fused path (4 MiB in fp32: the tile is
still in cache when multiplied, and the matrix products stay large enough to run at full rate)."""
_local = threading.local()  # each thread's TileScratch (the buffers are reused from one tile to the next)


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
    if (FUSED_CPU and x.device.type == "cpu" and q.device.type == "cpu" and tiles_by_row_blocks(q)
            and not torch.compiler.is_compiling()):  # its reused buffers are state a compiled graph cannot keep
        return _NF4TiledMatmul.apply(x, bias, q)
    return frozen_linear(x, functools.partial(dequantize_nf4, q), bias)


@functools.cache
def _native_half_gemm() -> bool:
    """Whether this CPU multiplies bf16/fp16 matrices natively (AVX512-BF16, AMX); True where unknown,
    which keeps the products in the input's dtype, as the reference computes them."""
    flags = cpu_flags()
    return flags is None or any(f in flags for f in ("avx512_bf16", "amx_bf16", "amx_fp16", "avx512_fp16"))


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.bfloat16, torch.float16) and not _native_half_gemm():
        return torch.float32  # the same half-precision values, multiplied by the fp32 kernel (see the module docstring)
    return dtype


def _scratch() -> TileScratch:
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = TileScratch()
    return scratch


def _weight_tile(q: NF4Weight, rows: tuple[int, int], cols: tuple[int, int], dtype: torch.dtype,
                 gemm: torch.dtype, absmax: torch.Tensor, scratch: TileScratch) -> torch.Tensor:
    """A tile of the weight as the reference computes it (rounded to ``dtype``), held in ``gemm``."""
    tile = dequantize_nf4_tile(q, rows, cols, dtype, absmax, scratch)
    if gemm == dtype:
        return tile
    wide = scratch.get(tile.numel(), gemm, tile.device).view(tile.shape)  # exact: every half value is an fp32 one
    return wide.copy_(tile)


class _NF4TiledMatmul(torch.autograd.Function):
    """``F.linear(x, dequantize_nf4(q, x.dtype), bias)`` on CPU, dequantized and multiplied tile by tile:
    see the module docstring. Saves nothing full-size for backward (the packed storage is its owner's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Weight) -> torch.Tensor:
        ctx.q, ctx.bias_dtype = q, None if bias is None else bias.dtype
        n_out, n_in = q.shape
        dtype, gemm, scratch = x.dtype, _gemm_dtype(x.dtype), _scratch()
        absmax = block_absmax(q)  # fp32 (blocks,), decoded once for every tile
        x2 = x.reshape(-1, n_in).to(gemm)  # (tokens, in)
        y = torch.empty(x2.shape[0], n_out, dtype=gemm, device=x.device)  # (tokens, out)
        b = None if bias is None else bias.to(dtype).to(gemm)  # rounded as F.linear would round it
        step = max(1, TILE_VALUES // n_in)  # rows per tile
        for r0 in range(0, n_out, step):
            r1 = min(n_out, r0 + step)
            w = _weight_tile(q, (r0, r1), (0, n_in), dtype, gemm, absmax, scratch)  # (rows, in)
            if b is None:
                torch.mm(x2, w.t(), out=y[:, r0:r1])
            else:
                torch.addmm(b[r0:r1], x2, w.t(), out=y[:, r0:r1])
        return y.to(dtype).view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        q = ctx.q
        if ctx.needs_input_grad[0]:
            n_out, n_in = q.shape
            dtype, gemm, scratch = grad_out.dtype, _gemm_dtype(grad_out.dtype), _scratch()
            absmax = block_absmax(q)
            g2 = grad_out.reshape(-1, n_out).to(gemm)  # (tokens, out)
            gx = torch.empty(g2.shape[0], n_in, dtype=gemm, device=grad_out.device)  # (tokens, in)
            step = max(q.block_size, TILE_VALUES // n_out // q.block_size * q.block_size)  # whole blocks per row
            for c0 in range(0, n_in, step):
                c1 = min(n_in, c0 + step)
                torch.mm(g2, _weight_tile(q, (0, n_out), (c0, c1), dtype, gemm, absmax, scratch), out=gx[:, c0:c1])
            grad_x = gx.to(dtype).view(*grad_out.shape[:-1], n_in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"{type(self).__name__}: input of width {x.shape[-1]}, expected {self.in_features}")
        return nf4_linear(x, self.nf4, self.bias)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_absmax_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block_size={self.block_size}{dq}")
