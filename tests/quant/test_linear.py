"""NF4Linear (loratune/quant/linear.py): bitsandbytes' Linear4bit outputs and input gradients on the
same weights, no trainable parameters, nothing full-size saved for backward, bf16, state dicts, and
the fused tile-by-tile CPU product against dequantize-then-multiply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.errors import ConfigError
from loratune.quant import NF4Linear, dequantize_nf4, nf4_linear, quantize_nf4


def bnb_linear(w: torch.Tensor, b: torch.Tensor, compute_dtype: torch.dtype):
    bnb = pytest.importorskip("bitsandbytes")
    out_f, in_f = w.shape
    ref = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=compute_dtype, compress_statistics=True,
                            quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                   blocksize=64)
    ref.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    return ref.to("cpu")  # quantizes


@pytest.mark.parametrize("shape", [(96, 128), (40, 70), (33, 192)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_bitsandbytes_linear4bit(shape, dtype):
    """Outputs and input gradients bit for bit, with bnb's compute dtype set to the input's (fp32: its
    QLoRA default here; with compute_dtype fp32 a bf16 input is upcast by bnb, which we do not do)."""
    torch.manual_seed(0)
    w, b = torch.randn(shape) * 0.05, torch.randn(shape[0]) * 0.1
    ref = bnb_linear(w, b, dtype)
    ours = NF4Linear.from_weight(w, b)
    assert torch.equal(ours.weight_data, ref.weight.data.flatten())
    x = torch.randn(3, 5, shape[1]).to(dtype).requires_grad_(True)  # requires_grad: bnb's training path
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), ref(x_ref)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    # and the input gradient is grad_out @ W with W the dequantized weight
    expected = g @ ours.dequantized_weight(dtype)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_frozen_no_parameters_and_dtype_casts():
    torch.manual_seed(1)
    layer = NF4Linear.from_weight(torch.randn(24, 64), torch.randn(24))
    assert list(layer.parameters()) == []
    assert sorted(layer.state_dict()) == ["bias", "weight_absmax", "weight_absmax_offset", "weight_absmax_scale",
                                          "weight_data"]
    x = torch.randn(4, 64)
    y32 = layer(x)
    layer.to(torch.bfloat16)  # casts the bias; the fp32 block scales keep their format
    assert layer.bias.dtype == torch.bfloat16 and layer.weight_absmax_scale.dtype == torch.float32
    assert layer.weight_absmax_offset.dtype == torch.float32 and layer.weight_data.dtype == torch.uint8
    xb = x.to(torch.bfloat16)
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, F.linear(xb, layer.dequantized_weight(torch.bfloat16), layer.bias))
    torch.testing.assert_close(yb.float(), y32, rtol=0.02, atol=0.05)  # bf16 rounding of inputs and products
    assert layer.bits_per_param == pytest.approx(4.0 + 8 / 64 + 32 / 1536 + 32 / 1536, rel=1e-9)


def test_backward_saves_no_weight():
    """The dequantized weight is recomputed in backward, not kept: autograd saves nothing for the layer
    (a plain F.linear with a weight would save it)."""
    torch.manual_seed(2)
    layer = NF4Linear.from_weight(torch.randn(256, 512))
    x = torch.randn(8, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert saved == []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        F.linear(x, layer.dequantized_weight())
    assert 256 * 512 in saved
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(8, 512), rtol=1e-6, atol=1e-5)


def test_transposed_weight_and_functional_form():
    """A Conv1D-style (in, out) weight quantizes its (out, in) transpose; nf4_linear on an NF4Weight is
    the module's forward, with a trainable bias getting its gradient."""
    torch.manual_seed(3)
    w = torch.randn(70, 30)  # (in, out)
    a = NF4Linear.from_weight(w, transposed=True)
    b = NF4Linear.from_weight(w.t().contiguous())
    assert (a.in_features, a.out_features) == (70, 30) and torch.equal(a.weight_data, b.weight_data)
    assert a.dequantized_weight().shape == (30, 70)
    q = quantize_nf4(w.t().contiguous())
    bias = torch.zeros(30, requires_grad=True)
    x = torch.randn(2, 3, 70)
    y = nf4_linear(x, q, bias)
    assert torch.equal(y, a(x))
    y.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((30,), 6.0))
    torch.testing.assert_close(y, x @ dequantize_nf4(q).t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="width 69"):
        nf4_linear(torch.randn(2, 69), q)


def test_state_dict_loads_into_a_fresh_layer():
    torch.manual_seed(4)
    for dq in (True, False):
        src = NF4Linear.from_weight(torch.randn(48, 100), torch.randn(48), block_size=32, double_quant=dq)
        dst = NF4Linear(100, 48, bias=True, block_size=32, double_quant=dq)
        dst.load_state_dict(src.state_dict())
        x = torch.randn(5, 100)
        assert torch.equal(dst(x), src(x))
    with pytest.raises(ConfigError, match="2-D"):
        NF4Linear.from_weight(torch.randn(4, 4, 4))


def reference_product(x, w_dtype_values, bias, g):
    """fp64 output and input gradient of ``x @ W^T + bias`` on the same (already rounded) values."""
    y = F.linear(x.double(), w_dtype_values.double(), None if bias is None else bias.double())
    return y, g.double() @ w_dtype_values.double()


@pytest.mark.parametrize("tile", [1 << 20, 3 * 64 * 8], ids=["one-tile", "many-tiles"])
def test_fused_product_equals_dequantize_then_multiply_fp32(monkeypatch, tile):
    """The fused CPU product (tiles of the weight, each multiplied as it is dequantized) against the
    unfused one: fp32 outputs and input gradients within 1e-5 (a few fp32 units in the last place:
    each output is still one dot product over the whole inner dimension, only the kernel's blocking
    differs), and it never dequantizes the whole weight."""
    from loratune.quant import linear

    monkeypatch.setattr(linear, "TILE_VALUES", tile)
    torch.manual_seed(6)
    layer = NF4Linear.from_weight(torch.randn(96, 512) * 0.05, torch.randn(96) * 0.1)
    x = torch.randn(2, 7, 512, requires_grad=True)
    g = torch.randn(2, 7, 96)

    def no_whole_weight(*args, **kwargs):
        raise AssertionError("the fused product dequantized the whole weight")

    with monkeypatch.context() as m:
        m.setattr(linear, "dequantize_nf4", no_whole_weight)
        y = layer(x)
        y.backward(g)
    monkeypatch.setattr(linear, "FUSED_CPU", False)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer(x_ref)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native-half-gemm", "fp32-gemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_product_half_precision(monkeypatch, native, dtype):
    """bf16/fp16 inputs: the weight rounded to the input's dtype as dequantize_nf4 rounds it, multiplied
    either by the half-precision kernel (a CPU with native bf16/fp16 GEMM: then bit for bit F.linear on
    that weight) or by the fp32 kernel on the same values (AVX2 CPUs); either way within one unit in
    the last place of the input's dtype of the exact product on those values."""
    from loratune.quant import linear

    monkeypatch.setattr(linear, "_native_half_gemm", lambda: native)
    monkeypatch.setattr(linear, "TILE_VALUES", 64 * 64)
    torch.manual_seed(7)
    layer = NF4Linear.from_weight(torch.randn(128, 256) * 0.05, torch.randn(128) * 0.1).to(dtype)
    x = torch.randn(9, 256).to(dtype).requires_grad_(True)
    g = torch.randn(9, 128).to(dtype)
    y = layer(x)
    y.backward(g)
    assert y.dtype == dtype and x.grad.dtype == dtype
    w = layer.dequantized_weight(dtype)
    y64, gx64 = reference_product(x.detach(), w, layer.bias, g)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(y.double(), y64, rtol=ulp, atol=ulp * float(y64.abs().max()) * 2 ** -4)
    torch.testing.assert_close(x.grad.double(), gx64, rtol=ulp, atol=ulp * float(gx64.abs().max()) * 2 ** -4)
    if native:
        assert torch.equal(y, F.linear(x.detach(), w, layer.bias))


def test_fused_product_in_and_out_of_inference_mode(monkeypatch):
    """A run samples under inference mode between training steps: the fused product's reused buffers
    must not turn into inference tensors that the next training step cannot write."""
    from loratune.quant import linear
    from loratune.quant.nf4 import TileScratch

    monkeypatch.setattr(linear._local, "scratch", TileScratch(), raising=False)  # fresh: first made in inference mode
    torch.manual_seed(8)
    layer = NF4Linear.from_weight(torch.randn(64, 128))
    x = torch.randn(3, 128)
    with torch.inference_mode():
        y_inf = layer(x)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    y.sum().backward()
    assert torch.equal(y.detach(), y_inf)
    torch.testing.assert_close(xg.grad, layer.dequantized_weight().sum(0).expand(3, 128), rtol=1e-6, atol=1e-5)
