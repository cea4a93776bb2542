"""Causal self-attention kernels: PyTorch's SDPA, or where they train faster on CPU, batched matmuls
or query-block tiles.

CPU training picks by sequence length, from measurements (fp32, one thread, AMD EPYC with AVX2;
``python benchmarks/profile_step.py --attention``; forward + backward at the SmolLM2-135M and
Qwen3-0.6B shapes, docs/benchmarks.md, "Llama shapes at seq 512 and 2048"):

- up to ``MATMUL_MAX_T`` (128) positions, scores + softmax + weighted sum as two batched matmuls
  with a float32 softmax (:func:`causal_matmul_attention`); it keeps T x T probabilities for the
  backward pass, which is small at 128 positions (benchmarks/results/cpu.json, GPT-2);
- beyond, SDPA's flash kernel. :func:`~loratune.models.tiled_attention.tiled_attention` is
  exact, and alone it beat SDPA at 512 positions and matched it at 2,048. Whole training steps
  with it were no faster, though (benchmarks/results/cpu-llama-long.json, single runs on a shared
  machine), so it is off by default (``TILED_MAX_T`` = ``MATMUL_MAX_T``). Setting ``TILED_MAX_T``
  higher (1,024 was the candidate) turns it on for CPU training up to that length.

Compiled blocks (models/compile.py), inference, dropout and other devices use SDPA. Grouped-query
attention is never copied: SDPA gets ``enable_gqa`` (copying k and v with repeat_interleave was
slower in every measured case), the matmul and tiled paths stack a group's query heads as rows. Every path agrees
with SDPA within float rounding (tests/models/test_attention.py, test_tiled_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tiled_attention import tiled_attention

MATMUL_MAX_T = 128  # CPU training with at most this many positions uses the matmul path (it keeps the
# B x heads x T x T probabilities for the backward pass: small at 128, a real cost in memory beyond)
TILED_MAX_T = MATMUL_MAX_T  # ... and up to this many, the tiled path (tiled_attention.py): off by default, as in
# the whole step it showed no gain over SDPA's flash kernel (module docstring); raise it to turn the path on


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
           scale: float, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for (B, nh, T, hs) queries over (B, nkv, L, hs) keys/values.

    With fewer key/value heads than query heads (grouped-query attention), query head h uses
    kv head h // (nh / nkv), as transformers' repeat_kv; the keys and values are not copied.
    """
    T = q.shape[2]
    is_causal = True if is_causal else False  # a SymBool under torch.compile with a dynamic length: SDPA takes a bool
    if ((is_causal or (mask is not None and mask.dim() >= 2 and (mask.dim() < 4 or mask.shape[1] == 1)))
            and q.device.type == "cpu" and dropout_p == 0.0 and torch.is_grad_enabled() and k.shape[2] == T):
        if T <= MATMUL_MAX_T:
            return causal_matmul_attention(q, k, v, scale, None if is_causal else mask)
        if T <= TILED_MAX_T and not torch.compiler.is_compiling():  # compiled blocks keep SDPA (a Python loop
            # over a dynamic length would not trace)
            return tiled_attention(q, k, v, scale, None if is_causal else mask)
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              dropout_p=dropout_p, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          dropout_p=dropout_p)


def causal_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention as two batched matmuls; the softmax runs in float32 whatever q's dtype.

    Grouped-query attention stacks the query heads that share a kv head along the rows,
    (B * nkv, rep * T, hs), so each group is one matmul against its keys, uncopied. ``mask``
    (B, 1, T, T), True where a query sees a key, replaces plain causality (packed sequences).
    """
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    if mask is None:
        bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # -inf above the diagonal
        if rep > 1:
            bias = bias.repeat(rep, 1)  # (rep * T, T): the same causal rows for every query head of a group
    else:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B or 1, 1, T, T)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        bias = bias[:, :, None].expand(B, nkv, rep, T, T).reshape(B * nkv, rep * T, T)
    scores = torch.baddbmm(bias, q.reshape(B * nkv, rep * T, hs), k.reshape(B * nkv, T, hs).transpose(1, 2),
                           alpha=scale)  # (B * nkv, rep * T, T)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs, v.reshape(B * nkv, T, hs)).view(B, nh, T, hs)


def segment_mask(position_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T) of packed rows: True where a query sees a key.

    Each example of a packed row starts where its position id is 0, and sees only its own
    earlier tokens (within ``window`` for sliding-window layers), so examples never attend to
    each other (as transformers' packing with position_ids, flash-attention's varlen).
    """
    T = position_ids.shape[1]
    segment = (position_ids == 0).cumsum(-1)  # (B, T): which example each token belongs to
    idx = torch.arange(T, device=position_ids.device)
    keep = (segment[:, :, None] == segment[:, None, :]) & (idx[:, None] >= idx[None, :])  # (B, T, T)
    if window is not None:
        keep = keep & (idx[:, None] - idx[None, :] < window)
    return keep[:, None]
