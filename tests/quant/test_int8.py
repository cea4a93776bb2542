"""Int8 weight-only storage (loratune/quant/int8.py): torchao's Int8WeightOnlyConfig codes, scales and
dequantized weights bit for bit; the layer's products, gradients and frozen state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.errors import CheckpointError, ConfigError
from loratune.quant.int8 import Int8Linear, dequantize_int8, quantize_int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_equals_torchao_int8_weight_only(dtype):
    quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 40).to(dtype)
    w = lin.weight.detach().clone()
    quantization.quantize_(lin, quantization.Int8WeightOnlyConfig())
    codes, scale = quantize_int8(w)
    assert torch.equal(codes, lin.weight.qdata)
    assert torch.equal(scale, lin.weight.scale.flatten())
    assert torch.equal(dequantize_int8(codes, scale, dtype), lin.weight.dequantize())


def test_round_trip_error_bound():
    """Each value is within half a step (absmax / 127.5 / 2) of the original, except a row's extreme, which
    clips to 127 steps (torchao's symmetric range): within one step."""
    torch.manual_seed(1)
    w = torch.randn(64, 512)
    codes, scale = quantize_int8(w)
    err = (dequantize_int8(codes, scale) - w).abs()
    step = (w.abs().amax(1) / 127.5)[:, None]
    assert int((err <= step / 2 * (1 + 1e-5)).sum()) >= w.numel() - 64
    assert bool((err <= step * (1 + 1e-5)).all())
    rel_rms = float(err.pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert 0.006 < rel_rms < 0.009  # uniform rounding: step / sqrt(12), step ~ 3.3 sigma / 127.5 for 512 values


def test_layer_forward_backward_and_state():
    torch.manual_seed(2)
    w, b = torch.randn(24, 80) * 0.1, torch.randn(24)
    layer = Int8Linear.from_weight(w.t().contiguous(), b, transposed=True)
    assert (layer.in_features, layer.out_features, list(layer.parameters())) == (80, 24, [])
    assert layer.bits_per_param == 8 + 32 / 80
    x = torch.randn(2, 3, 80, requires_grad=True)
    y = layer(x)
    deq = layer.dequantized_weight()
    assert torch.equal(y, F.linear(x, deq, b))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, deq.sum(0).expand(2, 3, 80), rtol=1e-6, atol=1e-5)
    fresh = Int8Linear(80, 24)
    fresh.load_state_dict(layer.state_dict())
    fresh.to(torch.bfloat16)  # casts the bias only
    assert fresh.weight_scale.dtype == torch.float32 and fresh.bias.dtype == torch.bfloat16
    assert torch.equal(fresh(x.detach().bfloat16()), F.linear(x.detach().bfloat16(), layer.dequantized_weight(
        torch.bfloat16), b.bfloat16()))


def test_bad_inputs():
    with pytest.raises(CheckpointError, match="to int8: 1 of its values are NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ConfigError, match="2-D"):
        quantize_int8(torch.randn(4, 4, 4))
    with pytest.raises(ConfigError, match="input of width 7, expected 80"):
        Int8Linear(80, 24)(torch.randn(2, 7))
