"""The fused chunked head + cross-entropy equals the plain computation, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from loratune.train.loss import IGNORE, count_targets, linear_cross_entropy_sum, lm_loss_sum
from loratune.models import GPT2, GPT2Config


def _reference(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_loss_and_grads_equal_plain_fp32(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(150, 24, generator=g, requires_grad=True)
    w = torch.randn(300, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (150,), generator=g)
    y[::5] = IGNORE
    ours = linear_cross_entropy_sum(h, w, y, chunk=chunk)
    (ours * 0.37).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _reference(h2, w2, y)
    (ref * 0.37).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert h.grad[::5].abs().sum() == 0  # ignored positions get no gradient


@pytest.mark.parametrize("chunk", [7, 1000])
def test_softcapped_loss_and_grads_equal_plain_fp32(chunk):
    """Gemma's final_logit_softcapping: CE of cap * tanh(z / cap), values and both gradients."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(90, 16, generator=g, requires_grad=True)
    w = (torch.randn(200, 16, generator=g) * 2).requires_grad_()  # logits well past the cap: tanh bends
    y = torch.randint(0, 200, (90,), generator=g)
    y[::4] = IGNORE
    ours = linear_cross_entropy_sum(h, w, y, chunk=chunk, softcap=5.0)
    (ours * 0.5).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    z = h2 @ w2.t()
    assert z.abs().max() > 15  # the cap matters here
    ref = F.cross_entropy(torch.tanh(z / 5.0) * 5.0, y, ignore_index=IGNORE, reduction="sum")
    (ref * 0.5).backward()
    assert abs(float(ours.detach()) - float(_reference(h2.detach(), w2.detach(), y))) > 1.0  # differs from the uncapped loss
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_chunked_loss_bf16_within_bf16_tolerance_of_fp32():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g)
    w = torch.randn(500, 32, generator=g) * 0.1
    y = torch.randint(0, 500, (64,), generator=g)
    hb = h.to(torch.bfloat16).requires_grad_()
    ours = linear_cross_entropy_sum(hb, w.to(torch.bfloat16), y)
    ours.backward()
    h32 = h.clone().requires_grad_()
    ref = _reference(h32, w, y)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0.0)
    assert hb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hb.grad.float(), h32.grad, rtol=5e-2, atol=5e-3)


def test_all_ignored_gives_zero_and_no_grad_needed_under_no_grad():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8)
    y = torch.full((10,), IGNORE)
    assert float(linear_cross_entropy_sum(h, w, y).detach()) == 0.0
    assert count_targets(y) == 0
    with torch.no_grad():
        assert linear_cross_entropy_sum(h, w, torch.zeros(10, dtype=torch.long)).requires_grad is False


def test_lm_loss_sum_matches_logits_path_on_gpt2():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)).init_weights(0)
    x = torch.randint(0, 97, (3, 16))
    y = torch.randint(0, 97, (3, 16))
    y[0, :5] = IGNORE
    ours = lm_loss_sum(model, x, y)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for n, p in model.named_parameters():  # the tied embedding gets both its input and its head gradient
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
