"""loratune/models/attention.py: the batched-matmul causal attention agrees with SDPA, forward
and backward, and ``attend`` only takes it where it is exact to use (CPU, causal, no mask,
no dropout, gradients on, short sequences); every path ``attend`` takes (matmul, tiled, SDPA)
handles grouped-query heads as transformers' repeat_kv does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.models import attention
from loratune.models.attention import MATMUL_MAX_T, attend, causal_matmul_attention

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _qkv(dtype: torch.dtype, T: int = 48, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, T, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [0.25, 0.05])
def test_matmul_attention_equals_sdpa_forward_and_backward(dtype, scale):
    q, k, v = _qkv(dtype)
    grad = torch.randn(2, 3, 48, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = causal_matmul_attention(q, k, v, scale)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["matmul", "matmul-masked", "tiled", "tiled-masked", "sdpa-causal", "sdpa-masked"])
def test_grouped_query_attention_equals_repeated_kv_heads(dtype, path, monkeypatch):
    """6 query heads over 2 kv heads: each group of 3 query heads uses its kv head, as transformers'
    repeat_kv does (kv head h // 3), forward and backward, on every path attend takes."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 20, 8, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 20, 8, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(2, 6, 20, 8, generator=gen).to(dtype)
    mask = torch.ones(20, 20, dtype=torch.bool).tril()[None, None] if path.endswith("masked") else None
    if not path.startswith("matmul"):
        monkeypatch.setattr(attention, "MATMUL_MAX_T", 0)  # past the matmul path's length limit
    if path.startswith("sdpa"):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as in a compiled block: SDPA
    ours = attend(q, k, v, mask, mask is None, 0.3, 0.0)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    kr, vr = (t.repeat_interleave(3, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_first_position_attends_only_to_itself():
    q, k, v = _qkv(torch.float32, T=5)
    out = causal_matmul_attention(q, k, v, 0.3)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # one visible key: weight exactly 1


def _path_taken(monkeypatch, *args, grad: bool = True) -> str:
    taken = []
    real = attention.causal_matmul_attention
    monkeypatch.setattr(attention, "causal_matmul_attention", lambda *a: taken.append("matmul") or real(*a))
    with torch.set_grad_enabled(grad):
        attend(*args)
    return taken[0] if taken else "sdpa"


def test_attend_uses_matmul_path_only_where_it_applies(monkeypatch):
    q, k, v = _qkv(torch.float32, T=32)
    assert _path_taken(monkeypatch, q, k, v, None, True, 0.25, 0.0) == "matmul"
    assert _path_taken(monkeypatch, q, k, v, None, True, 0.25, 0.0, grad=False) == "sdpa"  # inference: SDPA
    assert _path_taken(monkeypatch, q, k, v, None, True, 0.25, 0.1) == "sdpa"  # attention dropout
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    assert _path_taken(monkeypatch, q, k, v, mask, False, 0.25, 0.0) == "matmul"  # explicit mask (packed rows)
    assert _path_taken(monkeypatch, q, k, v, mask, False, 0.25, 0.0, grad=False) == "sdpa"
    long = _qkv(torch.float32, T=MATMUL_MAX_T + 1)
    assert _path_taken(monkeypatch, *long, None, True, 0.25, 0.0) == "sdpa"


def test_model_in_training_mode_matches_transformers(tiny_ckpt):
    """Logits with gradients on (the matmul path) still equal transformers' GPT-2, and so do the
    gradients of a LoRA-free loss with respect to the weights of the first block."""
    from loratune.models import load_model
    from transformers import GPT2LMHeadModel

    ours, _ = load_model(tiny_ckpt)
    ref = GPT2LMHeadModel.from_pretrained(tiny_ckpt, attn_implementation="eager")
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(3))
    a, b = ours(ids), ref(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    a.float().square().mean().backward()
    b.float().square().mean().backward()
    ga = ours.transformer.h[0].attn.c_attn.weight.grad
    gb = ref.transformer.h[0].attn.c_attn.weight.grad.t()  # Conv1D stores (in, out)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matmul_path_with_a_block_diagonal_mask_equals_sdpa(kv_heads):
    """Packed rows: the matmul path with an explicit (B, 1, T, T) mask equals SDPA with that mask."""
    from loratune.models.attention import causal_matmul_attention, segment_mask

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 20, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, 20, 16, generator=gen) for _ in range(2))
    positions = torch.tensor([list(range(7)) + list(range(13)), list(range(20))])
    mask = segment_mask(positions, window=5)
    ours = causal_matmul_attention(q, k, v, 0.25, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
