"""4-bit NormalFloat (NF4) weights, QLoRA's storage for a frozen base: ours, byte for byte bitsandbytes'.

A weight is cut, in row-major order, into blocks of ``block_size`` values (64 by default). Each
block is divided by its absolute maximum ("absmax") and every value is replaced by the nearest
of the 16 :data:`NF4_LEVELS` (quantiles of N(0, 1) scaled to [-1, 1]: equal probability mass per
level for normally distributed weights). Two 4-bit codes share a byte, the first element in the
high nibble. With double quantization (QLoRA's "DQ") the fp32 absmaxes are stored again in 8
bits: their mean ("offset") is subtracted and the rest is quantized blockwise (256 absmaxes per
block) to bitsandbytes' signed 8-bit dynamic map, which brings the storage from 4.5 to ~4.127
bits per parameter.

Why not a library: bitsandbytes (the QLoRA authors' code, what PEFT's QLoRA uses) is the
reference, but it is a 43 MB dependency whose CPU path gets little attention (its 0.50 CPU
dequantize reads the wrong absmax when a row's length is a multiple of 16 but not of the block
size); torchao's ``NF4Tensor`` rounds the table to 4 decimals, double-quantizes differently and
only accepts weights whose size divides 64 x 256. So this file reproduces bitsandbytes' format
and rounding exactly (the tests compare packed bytes, absmax and dequantized values bit for
bit), in plain torch, for any weight size and any device:

- 4-bit codes: ``clamp(w * (1 / absmax), -1, 1)`` bucketed on the fp32 midpoints of the table
  (a value on a midpoint takes the lower level); a last partial block is divided by its absmax
  (clamped to >= 1e-38, which is stored) instead, and an odd count pads one zero code;
- 8-bit absmax codes: bitsandbytes' CPU kernel, which maps ``x / absmax`` through a 65,536-entry
  table of nearest codes (index ``trunc(fma((v + 1) / 2, 65535, 0.5))``), not an exact nearest.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError

NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
"""The 16 NF4 values of the QLoRA paper (Dettmers et al. 2023, appendix E) and bitsandbytes."""

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes bitsandbytes accepts for 4-bit weights (so any NF4Weight here loads there too)."""
ABSMAX_BLOCK = 256
"""Absmaxes per block of the second (8-bit) quantization, as bitsandbytes' compress_statistics."""
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_CHUNK_BYTES = 1 << 17  # dequantize this many packed bytes at a time on CPU (the fp32 chunk stays in cache)


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A weight stored as NF4: packed codes, per-block scales, and what it takes to restore it."""

    data: torch.Tensor
    """uint8 (ceil(numel / 2),): two 4-bit codes per byte, the first element in the high nibble."""
    absmax: torch.Tensor
    """Per-block scale: fp32 (blocks,), or uint8 (blocks,) 8-bit codes under double quantization."""
    shape: tuple[int, ...]
    """The original weight's shape (a Linear weight is (out, in))."""
    dtype: torch.dtype
    """The original weight's dtype: what :func:`dequantize_nf4` returns unless told otherwise."""
    block_size: int = 64
    """Values per block sharing one absmax."""
    absmax_scale: torch.Tensor | None = None
    """Double quantization only: fp32 (ceil(blocks / 256),), the absmax of each 256 absmax codes."""
    absmax_offset: torch.Tensor | None = None
    """Double quantization only: fp32 0-d, the mean absmax subtracted before the 8-bit quantization."""

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)
        n, blocks = self.numel, self.blocks
        problems = []
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            problems.append(f"data should be {(n + 1) // 2} uint8 bytes, is {self.data.numel()} {self.data.dtype}")
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != blocks:
            problems.append(f"absmax should be {blocks} {want} values, is {self.absmax.numel()} {self.absmax.dtype}")
        if (self.absmax_scale is None) != (self.absmax_offset is None):
            problems.append("absmax_scale and absmax_offset go together (double quantization)")
        if self.double_quant and self.absmax_scale.numel() != -(-blocks // ABSMAX_BLOCK):
            problems.append(f"absmax_scale should hold {-(-blocks // ABSMAX_BLOCK)} values")
        if problems:
            raise CheckpointError(f"inconsistent NF4 weight of shape {tuple(self.shape)}: " + "; ".join(problems))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.block_size)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @classmethod
    def empty(cls, shape: tuple[int, ...], block_size: int = 64, double_quant: bool = True,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> NF4Weight:
        """Zero-filled storage of the right sizes, for a module that loads its state dict afterwards."""
        _check_block_size(block_size)
        n = math.prod(shape)
        blocks = -(-n // block_size)
        data = torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device)
        if not double_quant:
            return cls(data, torch.zeros(blocks, device=device), tuple(shape), dtype, block_size)
        return cls(data, torch.zeros(blocks, dtype=torch.uint8, device=device), tuple(shape), dtype, block_size,
                   torch.zeros(-(-blocks // ABSMAX_BLOCK), device=device), torch.zeros((), device=device))

    def to(self, device: torch.device | str) -> NF4Weight:
        """The same weight on ``device`` (the stored dtypes never change: they are the format)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, data=move(self.data), absmax=move(self.absmax), absmax_scale=move(self.absmax_scale),
                       absmax_offset=move(self.absmax_offset))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stored tensor plus the shape, dtype and block size as int64 tensors (safetensors-friendly)."""
        out = {"data": self.data, "absmax": self.absmax, "shape": torch.tensor(self.shape, dtype=torch.int64),
               "block_size": torch.tensor(self.block_size), "dtype": torch.tensor(_DTYPE_CODES[self.dtype])}
        if self.double_quant:
            out.update(absmax_scale=self.absmax_scale, absmax_offset=self.absmax_offset)
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> NF4Weight:
        """Rebuild a weight from :meth:`state_dict`'s tensors; a missing or inconsistent one is refused by name."""
        missing = [k for k in ("data", "absmax", "shape", "block_size", "dtype") if k not in tensors]
        if missing:
            raise CheckpointError(f"NF4 weight is missing {', '.join(missing)} (has {', '.join(sorted(tensors))})")
        dtypes = {code: dtype for dtype, code in _DTYPE_CODES.items()}
        code = int(tensors["dtype"])
        if code not in dtypes:
            raise CheckpointError(f"NF4 weight has an unknown dtype code {code}")
        return cls(tensors["data"], tensors["absmax"], tuple(int(s) for s in tensors["shape"].tolist()),
                   dtypes[code], int(tensors["block_size"]), tensors.get("absmax_scale"), tensors.get("absmax_offset"))


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``w`` (any shape and size, a floating dtype) to NF4 exactly as bitsandbytes'
    ``quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=double_quant)`` does."""
    _check_block_size(block_size)
    _check_weight(w)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].view(-1, block_size)  # (full blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # an all-zero block stores 0 (it divides by 1e-38)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:  # the last partial block: as if padded with zeros, divided (not multiplied) by its absmax
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))  # the spare low nibble codes 0.0
    levels = _levels(flat.device)
    codes = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2, out_int32=True).to(torch.uint8)
    data = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Weight(data, absmax, tuple(w.shape), w.dtype, block_size)
    offset = absmax.mean()
    absmax_codes, absmax_scale = _quantize_absmax(absmax - offset)
    return NF4Weight(data, absmax_codes, tuple(w.shape), w.dtype, block_size, absmax_scale, offset)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back in its shape, in ``dtype`` (default: the original dtype): level x block absmax,
    computed in fp32 and rounded once to ``dtype``, equal to bitsandbytes' ``dequantize_4bit`` (to the flat
    blocks its quantize uses, where its 0.50 CPU kernel reads per-row ones: see the module docstring).

    Runs every forward and backward of a quantized layer, so it avoids full-size temporaries: a
    256-entry table maps each byte to its two fp32 levels (read as one int64), gathered and scaled
    a cache-sized chunk at a time.
    """
    dtype = dtype or q.dtype
    n, bs, device = q.numel, q.block_size, q.device
    absmax = block_absmax(q)  # fp32 (blocks,)
    pairs = _byte_table(device)  # int64 (256,): the bits of (level[byte >> 4], level[byte & 15])
    full = n // bs  # full blocks; a partial one is handled after the loop
    step = max(1, _CHUNK_BYTES * 2 // bs) if device.type == "cpu" else max(full, 1)
    if dtype == torch.float32:
        out = torch.empty((n + 1) // 2, dtype=torch.int64, device=device)  # written in place, viewed as fp32
        values = out.view(torch.float32)
    else:
        values = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, full, step):
        stop = min(full, start + step)
        b0, b1 = start * bs // 2, stop * bs // 2  # packed bytes of these blocks
        if dtype == torch.float32:
            torch.index_select(pairs, 0, q.data[b0:b1].int(), out=out[b0:b1])
            values[2 * b0:2 * b1].view(-1, bs).mul_(absmax[start:stop, None])  # (blocks, bs) * (blocks, 1)
        else:
            chunk = pairs.index_select(0, q.data[b0:b1].int()).view(torch.float32).view(-1, bs)
            values[2 * b0:2 * b1].view(-1, bs).copy_(chunk.mul_(absmax[start:stop, None]))
    if full * bs < n:
        tail = pairs.index_select(0, q.data[full * bs // 2:].int()).view(torch.float32)[: n - full * bs]
        values[full * bs:n] = tail * absmax[full]
    return values[:n].view(q.shape)


class TileScratch:
    """Reusable buffers for :func:`dequantize_nf4_tile`, one set per thread and device: a training step
    dequantizes hundreds of tiles, and fresh tensors of a few MiB would each be mapped and zeroed by the
    kernel (glibc serves them with mmap once its threshold is pinned at 1 MiB, as training pins it)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype, bool], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D ``dtype`` buffer of ``numel`` values, grown (never shrunk) as needed. Inference mode
        keeps its own (a tensor made there cannot be written outside it, e.g. after sampling mid-run)."""
        key = (device, dtype, torch.is_inference_mode_enabled())
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def tiles_by_row_blocks(q: NF4Weight) -> bool:
    """Whether every row of a 2-D weight holds whole blocks (and whole bytes), so that any tile of rows
    and block-aligned columns can be dequantized on its own: true of every Llama-family projection."""
    return len(q.shape) == 2 and q.shape[1] % q.block_size == 0


def dequantize_nf4_tile(q: NF4Weight, rows: tuple[int, int], cols: tuple[int, int], dtype: torch.dtype,
                        absmax: torch.Tensor, scratch: TileScratch) -> torch.Tensor:
    """Rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` of a 2-D NF4 weight, in ``dtype``, bit for
    bit those of :func:`dequantize_nf4` (same table, one fp32 multiply, one rounding to ``dtype``).

    For a fused dequantize-and-multiply that never builds the whole weight: ``absmax`` is
    :func:`block_absmax` of ``q`` (decoded once per product), the columns are block-aligned
    (:func:`tiles_by_row_blocks`), and the result is a view of ``scratch``'s buffers, valid until the
    next call with the same scratch.
    """
    (r0, r1), (c0, c1) = rows, cols
    n_out, n_in = q.shape
    bs = q.block_size
    if not tiles_by_row_blocks(q) or c0 % bs or c1 % bs or not (0 <= r0 < r1 <= n_out and 0 <= c0 < c1 <= n_in):
        raise ConfigError(f"NF4 tile rows {rows}, columns {cols} are not whole blocks inside a weight of shape "
                          f"{tuple(q.shape)} (block {bs}); dequantize the whole weight instead")
    h, w = r1 - r0, c1 - c0
    codes = q.data.view(n_out, n_in // 2)[r0:r1, c0 // 2:c1 // 2]  # (h, w / 2) packed bytes
    index = scratch.get(h * w // 2, torch.int32, q.device).view(h, w // 2)
    index.copy_(codes)  # index_select wants int32/int64 indices
    pairs = scratch.get(h * w // 2, torch.int64, q.device)
    torch.index_select(_byte_table(q.device), 0, index.view(-1), out=pairs)  # each byte -> its two fp32 levels
    values = pairs.view(torch.float32).view(h, w // bs, bs)
    values.mul_(absmax.view(n_out, n_in // bs)[r0:r1, c0 // bs:c1 // bs, None])
    if dtype == torch.float32:
        return values.view(h, w)
    out = scratch.get(h * w, dtype, q.device).view(h, w)
    out.copy_(values.view(h, w))
    return out


def block_absmax(q: NF4Weight) -> torch.Tensor:
    """The fp32 absmax of every block (decoding the 8-bit codes under double quantization)."""
    if not q.double_quant:
        return q.absmax
    blocks = q.absmax.numel()
    codes = _dynamic_map(q.device).index_select(0, q.absmax.int())
    codes = F.pad(codes, (0, q.absmax_scale.numel() * ABSMAX_BLOCK - blocks)).view(-1, ABSMAX_BLOCK)
    return (codes * q.absmax_scale[:, None]).reshape(-1)[:blocks] + q.absmax_offset


def bits_per_param(q: NF4Weight) -> float:
    """Stored bits per weight value, everything counted: ~4.127 with double quantization, 4.5 without
    (block 64), against 16 for bf16."""
    tensors = [q.data, q.absmax, q.absmax_scale, q.absmax_offset]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) * 8 / q.numel


# --------------------------------------------------------------------------- checks
def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ConfigError(f"NF4 block size must be a power of two from 32 to 4096 (as bitsandbytes), "
                          f"got {block_size!r}; 64 is QLoRA's")


def _check_weight(w: torch.Tensor, to: str = "NF4") -> None:
    if not w.is_floating_point():
        raise ConfigError(f"{to} quantizes floating-point weights, got a {w.dtype} tensor of shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ConfigError(f"cannot quantize an empty weight (shape {tuple(w.shape)}) to {to}")
    bad = ~torch.isfinite(w.detach())
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0, 0])
        raise CheckpointError(f"cannot quantize a weight of shape {tuple(w.shape)} to {to}: {int(bad.sum())} of its "
                              f"values are NaN or Inf (the first at flat index {first}); the checkpoint is corrupt "
                              "or training diverged, and a block scaled by Inf would turn all its values to NaN")


# --------------------------------------------------------------------------- tables
@functools.lru_cache(maxsize=None)
def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _byte_table(device: torch.device) -> torch.Tensor:
    levels = _levels(torch.device("cpu"))
    pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # (256, 2): (high, low) nibble
    return pairs.contiguous().view(torch.int64).reshape(256).to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_map(device: torch.device) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: 256 sorted 8-bit codes in [-1, 1], denser near 0."""
    values: list[float] = []
    for i in range(7):  # decades 1e-6 .. 1, 2**i codes each, both signs
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """bitsandbytes' CPU quantize table: for 65,536 evenly spaced values in [-1, 1], the code whose
    midpoint bracket holds them (uint8 (65536,))."""
    code = _dynamic_map(torch.device("cpu"))
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = torch.tensor(-1.0) + (2.0 * torch.arange(65536, dtype=torch.float32)) / torch.tensor(65535.0)
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8).to(device)


def _quantize_absmax(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of ``a`` (fp32 (blocks,)) in blocks of 256, and each block's absmax, as bitsandbytes'
    CPU ``quantize_blockwise`` computes them."""
    n = a.numel()
    padded = F.pad(a, (0, -(-n // ABSMAX_BLOCK) * ABSMAX_BLOCK - n)).view(-1, ABSMAX_BLOCK)  # (n2, 256)
    scale = padded.abs().amax(dim=1)
    v = (padded * (1.0 / scale)[:, None]).clamp(-1, 1).nan_to_num(nan=-1.0)  # 0 * inf: the kernel's index 0
    # the kernel's fma((v + 1) * 0.5, 65535, 0.5), one rounding to fp32: exact in float64 where it matters
    index = (((v + 1.0) * 0.5).double() * 65535.0 + 0.5).float().long()
    codes = _dynamic_lut(a.device)[index]
    codes[scale == 0] = 0  # an all-zero block stores code 0 (its absmax 0 makes it decode to 0)
    return codes.reshape(-1)[:n].contiguous(), scale
