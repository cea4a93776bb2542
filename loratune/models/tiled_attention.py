"""Causal attention over blocks of queries, for training on CPU: matmul-bound, and no T x T tensor kept.

Why: on a CPU without bf16 matrix units, fp32 is the fast precision, and SDPA's flash kernel
spends most of a training step's attention time in its backward pass, at 31-37% of the matmul
rate at 512 positions (docs/benchmarks.md, "Llama shapes at seq 512 and 2048"). The two-matmul path
(:func:`~loratune.models.attention.causal_matmul_attention`) multiplies the whole T x T score
matrix, half of it above the diagonal, and keeps B x heads x T x T probabilities for backward.

Here the queries go in blocks of ``block`` positions, and block i multiplies only against the keys
it can see, 0 .. end_i, so the products cover the lower triangle plus one diagonal block. Each
block's rows are softmaxed by torch's fused kernel in float32. Nothing of size T x T is saved.
The backward pass recomputes a block's probabilities from q and k (one more q k^T product, as
flash attention does), then runs torch's fused softmax backward. The key and value gradients
accumulate in float32. Every product is one batched matmul over (B x kv heads) with the query
heads of a group stacked as rows (grouped-query attention without copying k or v), so the time
goes to matmuls.

Exactness: the forward values and q/k/v gradients equal SDPA's / the math reference within float
rounding (tests/models/test_tiled_attention.py: causal, grouped-query, block-diagonal packed
and sliding-window masks, fp32 and bf16).
"""

from __future__ import annotations

import torch

BLOCK = 64
"""Query positions per block, at most. Smaller blocks compute less above the diagonal, larger ones
give longer matmuls and fewer Python-level calls; at 512 positions 64 was fastest at both shapes
(SmolLM2-135M: 118 / 126 / 161 ms for blocks of 64 / 128 / 256; benchmarks/profile_step.py --attention)."""
TILE_BYTES = 8 * 2**20
"""Float32 scores per tile, at most: the batch is split, and the block shortened (to 16 positions at
least), so that the backward pass's few live tiles stay small next to the activations, and under
glibc's mmap threshold, which would otherwise hand back fresh, page-faulting memory every block."""


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    mask: torch.Tensor | None = None, block: int = BLOCK) -> torch.Tensor:
    """softmax(q k^T * scale) v, causal, for (B, nh, T, hs) queries over (B, nkv, T, hs) keys/values.

    ``mask`` (B or 1, 1, T, T) or (T, T) bool, True where a query sees a key, replaces plain
    causality (packed rows, sliding windows); every query must see at least one key (itself, as
    :func:`~loratune.models.attention.segment_mask` makes it). Query head h uses kv head
    h // (nh / nkv), as transformers' repeat_kv.
    """
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B or 1, 1, T, T)
    return _TiledAttention.apply(q, k, v, scale, mask, block)


def _plan(q: torch.Tensor, block: int) -> tuple[int, int]:
    """(positions per query block, batch rows per chunk) that keep a tile within TILE_BYTES."""
    B, nh, T, _ = q.shape
    row = nh * T * 4  # bytes of one query position's scores, all heads
    n = min(block, max(16, TILE_BYTES // row))
    return n, max(1, min(B, TILE_BYTES // (row * n)))


def _chunks(B: int, T: int, n: int, bc: int):
    """(batch start, batch end, query start, query end) of every tile."""
    for b0 in range(0, B, bc):
        for s in range(0, T, n):
            yield b0, min(b0 + bc, B), s, min(s + n, T)


class _Tiles:
    """One batch chunk's operands, grouped by kv head: (G, rep, T, hs) scaled queries, (G, T, hs) keys and values."""

    def __init__(self, q, k, v, mask, scale: float, b0: int, b1: int, upper: torch.Tensor) -> None:
        _, nh, T, hs = q.shape
        self.nkv, self.rep, self.hs, self.upper = k.shape[1], nh // k.shape[1], hs, upper
        self.G = (b1 - b0) * self.nkv
        self.qs = torch.mul(q[b0:b1], scale, out=q.new_empty((b1 - b0, nh, T, hs))).view(self.G, self.rep, T, hs)
        self.k, self.v = k[b0:b1].reshape(self.G, T, hs), v[b0:b1].reshape(self.G, T, hs)
        self.mask = None if mask is None else mask[b0:b1] if mask.shape[0] > 1 else mask

    def q_rows(self, s: int, e: int) -> torch.Tensor:
        return self.qs[:, :, s:e].reshape(self.G, self.rep * (e - s), self.hs)  # (G, rep*n, hs): a group's heads as rows

    def probs(self, s: int, e: int) -> torch.Tensor:
        """float32 softmax (G, rep * n, e) of query positions s..e against keys 0..e, masked."""
        scores = torch.bmm(self.q_rows(s, e), self.k[:, :e].transpose(1, 2))  # (G, rep*n, e)
        n = e - s
        if self.mask is None:  # causal: only the diagonal block has keys above the diagonal
            scores.view(self.G, self.rep, n, e)[..., s:e].masked_fill_(self.upper[:n, :n], float("-inf"))
        else:
            hidden = ~self.mask[:, :, None, s:e, :e]  # (b or 1, 1, 1, n, e), over kv heads and group rows
            scores.view(-1, self.nkv, self.rep, n, e).masked_fill_(hidden, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask, block):
        B, nh, T, hs = q.shape
        n, bc = _plan(q, block)
        upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        out = q.new_empty(q.shape)  # contiguous, whatever q's strides (it arrives transposed)
        tiles = None
        for b0, b1, s, e in _chunks(B, T, n, bc):
            if s == 0:
                tiles = _Tiles(q, k, v, mask, scale, b0, b1, upper)
            p = tiles.probs(s, e).to(q.dtype)
            ob = torch.bmm(p, tiles.v[:, :e])  # (G, rep*n, hs)
            out[b0:b1, :, s:e] = ob.view(b1 - b0, nh, e - s, hs)
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale, ctx.block = scale, block
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask = ctx.saved_tensors
        B, nh, T, hs = q.shape
        nkv, dtype = k.shape[1], q.dtype
        n, bc = _plan(q, ctx.block)
        upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        grad = grad.contiguous()
        dq = q.new_empty(q.shape)
        dk = torch.zeros(B * nkv, T, hs, dtype=torch.float32, device=q.device)  # float32 accumulators
        dv = torch.zeros_like(dk)
        tiles = None
        for b0, b1, s, e in _chunks(B, T, n, bc):
            if s == 0:
                tiles = _Tiles(q, k, v, mask, ctx.scale, b0, b1, upper)
                g0, g1 = b0 * nkv, b1 * nkv
            probs = tiles.probs(s, e)  # recomputed: (G, rep*n, e)
            go = grad[b0:b1, :, s:e].reshape(tiles.G, tiles.rep * (e - s), hs)
            p = probs.to(dtype)
            dp = torch.bmm(go, tiles.v[:, :e].transpose(1, 2)).float()  # (G, rep*n, e)
            ds = torch.ops.aten._softmax_backward_data(dp, probs, -1, torch.float32).to(dtype)
            dq[b0:b1, :, s:e] = torch.bmm(ds, tiles.k[:, :e]).view(b1 - b0, nh, e - s, hs)
            if dtype == torch.float32:
                dv[g0:g1, :e].baddbmm_(p.transpose(1, 2), go)  # (e, rep*n) x (rep*n, hs)
                dk[g0:g1, :e].baddbmm_(ds.transpose(1, 2), tiles.q_rows(s, e))
            else:
                dv[g0:g1, :e] += torch.bmm(p.transpose(1, 2), go).float()
                dk[g0:g1, :e] += torch.bmm(ds.transpose(1, 2), tiles.q_rows(s, e)).float()
        dq.mul_(ctx.scale)
        return dq, dk.view(k.shape).to(dtype), dv.view(v.shape).to(dtype), None, None, None
