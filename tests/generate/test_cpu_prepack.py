"""loratune/generate/cpu_prepack.py: packed CPU weights give the same products as plain ``F.linear``, leave the
model exactly as it was, and never stand in for the ordinary path under autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import randomize_lora_
from loratune.generate import SamplingConfig, generate
from loratune.adapters.lora import LoRAConfig, LoRALinear
from loratune.generate.cpu_prepack import bf16_prepack_supported, prepacked_linears, prepack_available
from loratune.adapters.targets import inject_lora

pytestmark = pytest.mark.skipif(not prepack_available(torch.zeros(1)), reason="this PyTorch build has no oneDNN packing")
needs_bf16 = pytest.mark.skipif(not bf16_prepack_supported(),
                                reason="this CPU has no bf16 support in oneDNN (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")
BOTH = [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)]


def _ids(B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", BOTH, ids=str)
@torch.no_grad()
def test_packed_model_gives_the_same_logits(small_gpt2, dtype):
    model = small_gpt2.to(dtype)
    ids = _ids()
    plain = model(ids)
    with prepacked_linears(model, rows=2) as n:
        packed = model(ids)
    assert n == 2 * 4 + 1  # four projections per block and the head
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(packed, plain, **tol)


@torch.no_grad()
def test_unmerged_lora_layers_keep_their_update_when_packed(small_gpt2):
    inject_lora(small_gpt2, LoRAConfig(r=2, alpha=4, targets=["q", "v", "mlp.fc"]))
    randomize_lora_(small_gpt2)
    ids = _ids()
    plain = small_gpt2(ids)
    with prepacked_linears(small_gpt2, rows=2) as n:  # float32 is packed for batches of several rows
        packed = small_gpt2(ids)
    assert n == 9
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, _base_only(small_gpt2, ids), atol=1e-3)  # the update is really there


def _base_only(model, ids):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.enabled = False
    out = model(ids)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.enabled = True
    return out


def test_model_is_restored_and_later_weight_changes_are_seen(small_gpt2):
    ids = _ids()
    with torch.no_grad(), prepacked_linears(small_gpt2, rows=2) as n:
        small_gpt2(ids)
    assert n > 0
    assert not any("forward" in m.__dict__ or "_base" in m.__dict__ for m in small_gpt2.modules())
    with torch.no_grad():
        small_gpt2.transformer.h[0].mlp.c_fc.weight.mul_(2.0)
        changed = small_gpt2(ids)
        with prepacked_linears(small_gpt2, rows=2):
            packed = small_gpt2(ids)
    torch.testing.assert_close(packed, changed, rtol=1e-5, atol=1e-5)


def test_autograd_inside_the_block_takes_the_ordinary_path(small_gpt2):
    inject_lora(small_gpt2, LoRAConfig(r=2, alpha=4, targets=["q", "v"]))
    randomize_lora_(small_gpt2)
    a = next(iter(small_gpt2.transformer.h[0].attn.c_attn.lora_A.values()))
    with prepacked_linears(small_gpt2, rows=2):
        small_gpt2(_ids()).square().mean().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_float32_is_packed_for_several_rows_only(small_gpt2):
    """At one row oneDNN's packed float32 product decodes slower than the plain one."""
    with prepacked_linears(small_gpt2, rows=1) as n:
        assert n == 0
    with prepacked_linears(small_gpt2, rows=2) as n:
        assert n == 2 * 4 + 1


@needs_bf16
def test_bf16_is_packed_even_for_one_row(small_gpt2):
    """bf16 gains at one row too, where the CPU supports it."""
    with prepacked_linears(small_gpt2.to(torch.bfloat16), rows=1) as n:
        assert n == 2 * 4 + 1


@pytest.mark.skipif(bf16_prepack_supported(), reason="this CPU packs bf16 (tested above)")
@torch.no_grad()
def test_bf16_takes_the_ordinary_path_where_the_cpu_cannot_pack_it(small_gpt2):
    """On an AVX2-only CPU oneDNN refuses bf16 packing: nothing is packed, nothing fails, and the logits are
    the plain ones; float32 layers of the same model are still packed."""
    model = small_gpt2.to(torch.bfloat16)
    assert not prepack_available(model.lm_head.weight)
    ids = _ids()
    plain = model(ids)
    with prepacked_linears(model, rows=2) as n:
        assert n == 0
        assert torch.equal(model(ids), plain)
    model.transformer.h[0].mlp.c_fc.float()  # one float32 layer among bf16 ones is still packed
    with prepacked_linears(model, rows=2) as n:
        assert n == 1


def test_nothing_is_packed_where_it_does_not_apply(small_gpt2):
    half = small_gpt2.to(torch.float16)
    with prepacked_linears(half) as n:
        assert n == 0
    layer = nn.Linear(4, 4)
    assert prepack_available(layer.weight)
    assert not prepack_available(layer.weight.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # bf16 unpacked where unsupported
def test_generation_with_and_without_packing_is_identical(small_gpt2, dtype):
    model = small_gpt2.to(dtype)
    prompts = _ids(B=3, T=5)
    cfg = SamplingConfig(max_new_tokens=20)
    assert torch.equal(generate(model, prompts, cfg, prepack=True), generate(model, prompts, cfg, prepack=False))
