"""loratune/models/tiled_attention.py: the query-block attention equals SDPA (forward and q/k/v
gradients; causal, grouped-query, packed and sliding-window masks; fp32 and bf16), keeps nothing of
size T x T for the backward pass, and ``attend`` takes it for CPU training from ``MATMUL_MAX_T`` to
``TILED_MAX_T`` (raised here: it is off by default);
the Llama-style families still equal transformers in training mode at such a length."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.models import attention
from loratune.models.attention import MATMUL_MAX_T, attend, segment_mask
from loratune.models.tiled_attention import tiled_attention

FP32 = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(dtype, nh=6, nkv=2, T=100, hs=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, hs, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(B, nkv, T, hs, generator=g).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(B, nh, T, hs, generator=g).to(dtype)
    return q, k, v, grad


def _run(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _sdpa(mask, scale):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _masks(T: int):
    packed = torch.tensor([list(range(30)) + list(range(T - 30)), list(range(T))])  # row 0: two examples
    return {"causal": None, "packed": segment_mask(packed), "packed+window": segment_mask(packed, window=9),
            "2-d causal": torch.ones(T, T, dtype=torch.bool).tril()}


@pytest.mark.parametrize("mask_name", ["causal", "packed", "packed+window", "2-d causal"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("T,block", [(100, 32), (77, 16), (64, 128)], ids=["partial-last", "many", "one-block"])
def test_fp32_equals_sdpa_forward_and_gradients(mask_name, heads, T, block):
    q, k, v, grad = _inputs(torch.float32, *heads, T=T)
    mask = _masks(T)[mask_name]
    ours = _run(lambda *a: tiled_attention(*a, 0.3, mask, block), q, k, v, grad)
    ref = _run(_sdpa(mask, 0.3), q, k, v, grad)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("mask_name", ["causal", "packed+window"])
def test_bf16_as_close_to_float64_as_sdpa_in_bf16(mask_name):
    """bf16 inputs: the output and gradients are bf16, and their error against a float64 reference
    of the same inputs is at most 1.5x SDPA's own bf16 error (and under 2% of the largest value)."""
    q, k, v, grad = _inputs(torch.bfloat16, T=100)
    mask = _masks(100)[mask_name]
    ours = _run(lambda *a: tiled_attention(*a, 0.25, mask, 32), q, k, v, grad)
    sdpa = _run(_sdpa(mask, 0.25), q, k, v, grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _run(_sdpa(mask, 0.25), q64, k64, v64, grad.double())
    for a, s, r in zip(ours, sdpa, ref):
        assert a.dtype == torch.bfloat16
        err, sdpa_err = (a.double() - r).abs().max().item(), (s.double() - r).abs().max().item()
        assert err <= 1.5 * sdpa_err + 1e-3
        assert err <= 0.02 * r.abs().max().item()


@pytest.mark.parametrize("mask_name", ["causal", "packed+window"])
def test_tiles_split_by_batch_and_shortened_blocks_give_the_same_result(mask_name, monkeypatch):
    """A tile budget (TILE_BYTES) of 16 query positions of one batch row changes nothing but the tiling."""
    from loratune.models import tiled_attention as tiled

    q, k, v, grad = _inputs(torch.float32, T=100, B=3)
    mask = _masks(100)[mask_name]
    mask = None if mask is None else torch.cat([mask, mask[:1]])  # (3, 1, T, T): one mask per row
    whole = _run(lambda *a: tiled_attention(*a, 0.3, mask), q, k, v, grad)
    monkeypatch.setattr(tiled, "TILE_BYTES", 16 * 6 * 100 * 4)  # 16 positions x 6 heads x 100 keys, float32
    assert tiled._plan(q, tiled.BLOCK) == (16, 1)
    split = _run(lambda *a: tiled_attention(*a, 0.3, mask), q, k, v, grad)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, **FP32)
    ref = _run(_sdpa(mask, 0.3), q, k, v, grad)
    for a, b in zip(split, ref):
        torch.testing.assert_close(a, b, **FP32)


def test_first_position_sees_only_itself():
    q, k, v, _ = _inputs(torch.float32, T=40)
    out = tiled_attention(q, k, v, 0.3, block=16)
    torch.testing.assert_close(out[:, 0::3, 0], v[:, :, 0])  # heads 0, 3 use kv heads 0, 1: weight exactly 1


def test_backward_keeps_nothing_of_size_t_squared():
    """What autograd saves for the backward pass is q, k, v (and the mask): no probabilities."""
    q, k, v, grad = _inputs(torch.float32, T=256)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = tiled_attention(q, k, v, 0.3, block=64)
    assert sorted(saved) == sorted(t.numel() for t in (q, k, v))
    out.backward(grad)  # the saved tensors suffice
    assert q.grad is not None and k.grad is not None


def test_attend_takes_the_tiled_path_for_long_cpu_training(monkeypatch):
    monkeypatch.setattr(attention, "TILED_MAX_T", 1024)  # off by default (TILED_MAX_T = MATMUL_MAX_T)
    taken = []
    real = attention.tiled_attention
    monkeypatch.setattr(attention, "tiled_attention", lambda *a: taken.append(a[0].shape[2]) or real(*a))
    q, k, v, _ = _inputs(torch.float32, T=MATMUL_MAX_T + 8)
    attend(q, k, v, None, True, 0.25, 0.0)
    with torch.no_grad():
        attend(q, k, v, None, True, 0.25, 0.0)  # inference: SDPA
    attend(q, k, v, None, True, 0.25, 0.1)  # attention dropout: SDPA
    short = _inputs(torch.float32, T=MATMUL_MAX_T)
    attend(*short[:3], None, True, 0.25, 0.0)  # short: the two-matmul path
    monkeypatch.setattr(attention, "TILED_MAX_T", MATMUL_MAX_T + 4)
    attend(q, k, v, None, True, 0.25, 0.0)  # past TILED_MAX_T: SDPA
    monkeypatch.setattr(attention, "TILED_MAX_T", MATMUL_MAX_T + 8)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    attend(q, k, v, None, True, 0.25, 0.0)  # inside a compiled block: SDPA
    assert taken == [MATMUL_MAX_T + 8]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3", "gemma3"])
def test_families_in_training_mode_equal_transformers_past_the_short_path(name, tmp_path, monkeypatch):
    """Grad-enabled logits of 160 positions (the tiled path; Mistral's and Gemma's sliding windows
    as masks) equal transformers', and so does the gradient of a loss on them w.r.t. a q_proj weight."""
    from family_models import save_family

    from loratune.models import load_model

    monkeypatch.setattr(attention, "TILED_MAX_T", 1024)  # the tiled path, off by default
    hf = save_family(name, tmp_path)
    ours, _ = load_model(tmp_path)
    ids = torch.randint(0, 320, (2, 160), generator=torch.Generator().manual_seed(1))
    a, b = ours(ids), hf(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    a.float().square().mean().backward()
    b.float().square().mean().backward()
    ga = ours.model.layers[0].self_attn.q_proj.weight.grad
    gb = hf.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
