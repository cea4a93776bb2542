"""The decoder's memory-lean autograd functions, RMSNorm and the gated MLP activation: forward
bit-identical to transformers (LlamaRMSNorm, Gemma3RMSNorm, act(gate) * up), gradients equal to
autograd's through the plain formulas."""

from __future__ import annotations

import pytest
import torch

from loratune.models.decoder import RMSNorm


def _plain(x, weight, eps, unit_offset):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_equals_transformers_norms(unit_offset, dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = Gemma3RMSNorm(48, eps=1e-6) if unit_offset else LlamaRMSNorm(48, eps=1e-6)
    ours = RMSNorm(48, 1e-6, unit_offset)
    with torch.no_grad():
        w = torch.randn(48, generator=torch.Generator().manual_seed(0)) * 0.3 + (0 if unit_offset else 1)
        ref.weight.copy_(w)
        ours.weight.copy_(w)
    ref.to(dtype), ours.to(dtype)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("unit_offset", [False, True])
def test_gradients_equal_autograd_of_the_plain_formula(unit_offset):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 32, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(32, generator=g, dtype=torch.float64) * 0.3 + 1).requires_grad_()
    norm = RMSNorm(32, 1e-5, unit_offset).double()
    norm.weight = torch.nn.Parameter(w.detach().clone())
    up = torch.randn(4, 5, 32, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(norm(x), (x, norm.weight), up)
    ref = torch.autograd.grad(_plain(x, w, 1e-5, unit_offset), (x, w), up)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # both compute in float32 (x.float())


def test_bf16_gradients_close_to_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g)
    up = torch.randn(8, 64, generator=g)
    norm = RMSNorm(64, 1e-6)
    xb = x.bfloat16().requires_grad_()
    gx = torch.autograd.grad(norm.bfloat16()(xb), xb, up.bfloat16())[0].float()
    x64 = x.double().requires_grad_()
    ref = torch.autograd.grad(_plain(x64, torch.ones(64, dtype=torch.float64), 1e-6, False), x64, up.double())[0]
    assert (gx - ref).abs().max() / ref.abs().max() < 0.02


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_activation_equals_autograd_forward_and_backward(gelu, dtype):
    """The MLP's act(gate) * up (SwiGLU / Gemma's GeGLU) with its memory-lean backward."""
    import torch.nn.functional as F

    from loratune.models.decoder import _GatedActFn

    g = torch.Generator().manual_seed(4)
    gate, up = (torch.randn(3, 5, 40, generator=g).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(3, 5, 40, generator=g).to(dtype)
    ours = _GatedActFn.apply(gate, up, gelu)
    ref = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (gate, up), grad), torch.autograd.grad(ref, (gate, up), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0) if dtype == torch.float32 else \
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
