"""GGUF's quantized blocks decoded in torch, bit for bit as gguf-py (llama.cpp's reference decoders).

A base kept in its GGUF quantization (``quantize: gguf``) is dequantized for every product, forward
and backward, so the decoder runs twice per layer per step: it has to be torch (vectorized over all
blocks, on the weight's device), not gguf-py's numpy. Each decoder below follows gguf-py's
``dequantize_blocks`` for its type (``gguf/quants.py``) operation by operation: the same float32
products and sums in the same order, so the result is bit-identical (``tests/quant/test_gguf_blocks.py``
checks each type against ``gguf.quants.dequantize`` on random blocks and on real files' tensors).

Input: one tensor's bytes as :class:`~loratune.hub.gguf_file.GGUFBlocks` holds them, a uint8 tensor
(rows, bytes per row), each row a run of blocks along the input dimension. Output: (rows, columns)
float32, or cast to the dtype asked for.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

QK_K = 256
"""Values per K-quant super-block."""
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210),
}
"""type -> (values per block, bytes per block), as gguf-py's ``GGML_QUANT_SIZES``."""


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) little-endian float16 bytes -> (N, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """(N, G * width) bytes -> (N, G, 2, width) float32: per group of ``width`` bytes, the low nibbles then
    the high. Written into one float tensor: a fresh full-size tensor per operation would cost more in page
    faults than the arithmetic (the decoder runs for every product)."""
    qs = qs.reshape(qs.shape[0], -1, 1, width)
    out = torch.empty((qs.shape[0], qs.shape[1], 2, width), dtype=torch.float32, device=qs.device)
    out[:, :, 0:1].copy_(qs & 0x0F)
    out[:, :, 1:2].copy_(qs >> 4)
    return out


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """(N, k) bytes -> (N, 8 k) uint8: bit i of the little-endian word, for i = 0 .. 8k - 1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], -1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return torch.empty((b.shape[0], 32), device=b.device).copy_(b[:, 2:].view(torch.int8)).mul_(d)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).sub_(8).mul_(d)  # (q - 8) exact in float32


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).mul_(d).add_(m)


def _q5(b: torch.Tensor, offset: int) -> torch.Tensor:
    """Q5_0 / Q5_1's 5-bit values as float32: the nibbles of ``qs`` plus 16 x bit i of the 32-bit word ``qh``."""
    qh, qs = b[:, offset:offset + 4], b[:, offset + 4:]
    return _nibbles(qs, 16).reshape(b.shape[0], 32).add_(_bits(qh) << 4)  # integers < 32: exact


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return _q5(b, 2).sub_(16).mul_(d)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _q5(b, 4).mul_(d).add_(m)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes -> the 8 sub-block scales and 8 mins, 6 bits each (gguf-py's get_scale_min)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn  # (N, 8) each


def _k_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: (N, 8, 1) sub-block scales d * sc and mins dmin * m, in float32 as gguf-py computes them."""
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    return (d * sc.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_scale_min(b)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32)
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_scale_min(b)
    qh, qs = b[:, 16:48], b[:, 48:]
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    high = (qh.reshape(n, 1, 32) >> shifts) & 1  # (N, 8, 32): sub-block j takes bit j of each qh byte
    q = _nibbles(qs, 32).reshape(n, 8, 32).add_(high << 4)
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = _nibbles(ql, 64).reshape(n, 8, 32).add_(high << 4).sub_(32)  # integers in [-32, 32): exact
    return q.reshape(n, 16, 16).mul_(d).reshape(n, QK_K)


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
DECODED_TYPES = tuple(BLOCK_SIZES)
"""The types :func:`dequantize_blocks` decodes: every type loratune reads from GGUF."""


def row_bytes(qtype: str, columns: int) -> int:
    """Bytes one row of ``columns`` values takes in ``qtype``; a row that is not whole blocks is refused."""
    if qtype not in BLOCK_SIZES:
        raise ConfigError(f"GGUF type {qtype} is not one loratune decodes; decoded: {', '.join(DECODED_TYPES)}")
    size, nbytes = BLOCK_SIZES[qtype]
    if columns % size:
        raise ConfigError(f"a row of {columns} values is not whole {qtype} blocks of {size}")
    return columns // size * nbytes


def dequantize_blocks(data: torch.Tensor, qtype: str, shape: tuple[int, ...],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data`` (rows, bytes per row) uint8 in GGUF type ``qtype`` -> the tensor of ``shape`` (rows, columns)
    in ``dtype``: decoded in float32 exactly as gguf-py decodes it, then cast."""
    rows, columns = shape[0], (shape[1] if len(shape) > 1 else shape[0])
    if len(shape) == 1:
        rows = 1
    if data.dtype != torch.uint8 or data.dim() != 2 or tuple(data.shape) != (rows, row_bytes(qtype, columns)):
        raise ConfigError(f"{qtype} blocks for shape {tuple(shape)} must be uint8 of shape "
                          f"({rows}, {row_bytes(qtype, columns)}), got {data.dtype} {tuple(data.shape)}")
    if qtype == "F32":
        out = data.view(torch.float32)
    elif qtype in ("F16", "BF16"):
        out = data.view(torch.float16 if qtype == "F16" else torch.bfloat16).float()
    else:
        out = _DECODERS[qtype](data.reshape(-1, BLOCK_SIZES[qtype][1]))  # (rows * blocks per row, size)
    out = out.reshape(shape)
    return out if out.dtype == dtype else out.to(dtype)
