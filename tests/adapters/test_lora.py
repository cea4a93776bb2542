"""loratune/adapters/lora.py and trainable.py: the LoRA layer's invariants, merging, configs, what trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import gpt2_124m_config, randomize_lora_, rel_err
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.errors import ConfigError, MergeError
from loratune.adapters.lora import LoRAConfig, LoRALinear, adapters_disabled, lora_layers, lora_scale, merge_lora, unmerge_lora
from loratune.models import GPT2
from loratune.adapters.trainable import parameter_report, set_trainable
from loratune.adapters.targets import inject_lora
from loratune.train.checkpoint import trainable_state

ALL_ALIASES = ["q", "v", "attn.out", "mlp.fc", "mlp.proj"]


def _ids(model: GPT2, B: int = 2, T: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=gen)


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# --- the adapted model starts as the base model ----------------------------------------------

def test_output_unchanged_while_B_is_zero(small_gpt2):
    ids = _ids(small_gpt2)
    with torch.no_grad():
        before = small_gpt2(ids)
        inject_lora(small_gpt2, LoRAConfig(r=4, alpha=16, targets=ALL_ALIASES))
        after = small_gpt2(ids)
    assert len(list(lora_layers(small_gpt2))) == 4 * small_gpt2.config.n_layer
    # B = 0 adds exact zeros: bit-identical, not merely close
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_kaiming_init_A_nonzero_B_zero():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Parameter(torch.randn(96, 32)), None, r=8, alpha=16,
                       slices={"q": (0, 32), "v": (64, 96)})
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32, as nn.Linear
    for name in ("q", "v"):
        a, b = layer.lora_A[name], layer.lora_B[name]
        assert a.shape == (8, 32) and b.shape == (32, 8)
        assert torch.count_nonzero(b) == 0
        assert torch.count_nonzero(a) == a.numel()
        assert a.abs().max() <= bound
        assert a.abs().max() > 0.8 * bound  # uniform over the whole range, not a tiny init
    assert not torch.equal(layer.lora_A["q"], layer.lora_A["v"])
    assert layer.lora_A["q"].dtype == torch.float32


# --- training touches only A and B -----------------------------------------------------------

def test_base_weights_bit_identical_after_adamw_steps(small_gpt2):
    inject_lora(small_gpt2, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["q", "v", "mlp.fc"]))
    set_trainable(small_gpt2, "lora")
    base = _base_state(small_gpt2)
    lora_before = {k: v.clone() for k, v in trainable_state(small_gpt2).items()}  # what a checkpoint saves
    # all parameters go to AdamW, with weight decay: frozen ones must be skipped because they have no grad
    opt = torch.optim.AdamW(small_gpt2.parameters(), lr=1e-2, weight_decay=0.1)
    small_gpt2.train()
    ids = _ids(small_gpt2, T=16)
    for _ in range(3):
        logits = small_gpt2(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = small_gpt2.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), f"base weight {k} changed"
    for name, p in small_gpt2.named_parameters():
        if ".lora_" not in name:
            assert p.grad is None, name
    for k, v in lora_before.items():
        assert not torch.equal(after[k], v), f"adapter tensor {k} did not train"


def test_slice_gradients_equal_the_dense_reference():
    """The fused, in-place slice update backpropagates like y = x (W + scale [B_q A_q; 0; B_v A_v])^T + b."""
    torch.manual_seed(0)
    C = 8
    W, b = torch.randn(3 * C, C), torch.randn(3 * C)
    layer = LoRALinear(nn.Parameter(W.clone(), requires_grad=False), nn.Parameter(b.clone(), requires_grad=False),
                       r=2, alpha=3, slices={"q": (0, C), "v": (2 * C, 3 * C)})
    with torch.no_grad():
        for p in layer.lora_B.values():
            p.normal_()
    A = {n: layer.lora_A[n].detach().clone().requires_grad_() for n in "qv"}
    B = {n: layer.lora_B[n].detach().clone().requires_grad_() for n in "qv"}
    x, target = torch.randn(4, 3, C), torch.randn(4, 3, 3 * C)
    delta = torch.cat([B["q"] @ A["q"], torch.zeros(C, C), B["v"] @ A["v"]])
    ref_loss = ((F.linear(x, W + layer.scale * delta, b) - target) ** 2).sum()
    ref_loss.backward()
    loss = ((layer(x) - target) ** 2).sum()
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n in "qv":
        torch.testing.assert_close(layer.lora_A[n].grad, A[n].grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_B[n].grad, B[n].grad, rtol=1e-4, atol=1e-5)
    assert layer.weight.grad is None


def test_set_trainable_rules(small_gpt2):
    with pytest.raises(ConfigError, match="no LoRA layers"):
        set_trainable(small_gpt2, "lora")
    inject_lora(small_gpt2, LoRAConfig(r=2, targets=["q", "v"]))
    set_trainable(small_gpt2, "lora")
    trainable = {n for n, p in small_gpt2.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora.default.lora_{m}.{s}"
                         for i in range(2) for m in "AB" for s in "qv"}
    set_trainable(small_gpt2, "full")
    assert all(p.requires_grad for p in small_gpt2.parameters())
    with pytest.raises(ConfigError, match="finetune"):
        set_trainable(small_gpt2, "prefix")


# --- merging ---------------------------------------------------------------------------------

@pytest.fixture
def adapted(small_gpt2) -> GPT2:
    inject_lora(small_gpt2, LoRAConfig(r=4, alpha=16, targets=ALL_ALIASES))
    randomize_lora_(small_gpt2, seed=3, std=0.3)
    return small_gpt2


@torch.no_grad()
def test_merged_equals_unmerged(adapted):
    ids = _ids(adapted)
    with adapters_disabled(adapted):
        base = adapted(ids)
    unmerged = adapted(ids)
    assert rel_err(unmerged, base) > 1e-2, "the adapter should change the output in this test"
    assert merge_lora(adapted) == 4 * adapted.config.n_layer
    assert all(m.merged for _, m in lora_layers(adapted))
    merged = adapted(ids)
    scale = unmerged.abs().max().item()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * scale)


def test_merge_then_unmerge_restores_base_weights(adapted):
    base = _base_state(adapted)
    merge_lora(adapted)
    merged = adapted.state_dict()
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
    # k's rows of the fused weight are not adapted by q,v: merging leaves them bit-identical
    C = adapted.config.n_embd
    assert torch.equal(merged["transformer.h.0.attn.c_attn.weight"][C:2 * C],
                       base["transformer.h.0.attn.c_attn.weight"][C:2 * C])
    assert unmerge_lora(adapted) == 4 * adapted.config.n_layer
    for k, v in adapted.state_dict().items():
        if ".lora_" not in k:
            torch.testing.assert_close(v, base[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_merge_refuses_nan_and_leaves_weight_untouched():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.zeros(8)), r=2, alpha=4)
    w = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["all"][0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.weight, w)
    with torch.no_grad():
        layer.lora_B["all"][0, 0] = float("inf")
    with pytest.raises(MergeError):
        layer.merge()


def test_double_merge_and_unmerge_unmerged_are_refused(adapted):
    layer = adapted.transformer.h[0].attn.c_attn
    with pytest.raises(MergeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    w = layer.weight.detach().clone()
    with pytest.raises(MergeError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, w)  # a refused merge adds nothing
    # the model-level helpers only touch layers in the other state
    assert merge_lora(adapted) == 4 * adapted.config.n_layer - 1
    assert merge_lora(adapted) == 0


def test_merge_does_not_happen_on_eval(adapted):
    w = adapted.transformer.h[0].attn.c_attn.weight.detach().clone()
    adapted.train()
    adapted.eval()
    assert not any(m.merged for _, m in lora_layers(adapted))
    assert torch.equal(adapted.transformer.h[0].attn.c_attn.weight, w)


@torch.no_grad()
def test_adapters_disabled_gives_base_output_and_restores(small_gpt2):
    ids = _ids(small_gpt2)
    base = small_gpt2(ids)
    inject_lora(small_gpt2, LoRAConfig(r=4, alpha=16, targets=ALL_ALIASES))
    randomize_lora_(small_gpt2, seed=5, std=0.3)
    adapted = small_gpt2(ids)
    assert rel_err(adapted, base) > 1e-2
    with adapters_disabled(small_gpt2) as m:
        assert m is small_gpt2
        torch.testing.assert_close(small_gpt2(ids), base, rtol=0, atol=0)
    torch.testing.assert_close(small_gpt2(ids), adapted, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"):  # restored even when the body fails
        with adapters_disabled(small_gpt2):
            raise RuntimeError("boom")
    assert all(layer.enabled for _, layer in lora_layers(small_gpt2))
    merge_lora(small_gpt2)
    with pytest.raises(MergeError, match="unmerge"):
        with adapters_disabled(small_gpt2):
            pass


# --- config and scaling ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(r=0), dict(r=-2), dict(r=2.5), dict(r=True),
    dict(alpha=0), dict(alpha=-1.0), dict(alpha=float("nan")), dict(alpha=float("inf")),
    dict(dropout=-0.1), dict(dropout=1.0), dict(dropout=1.5),
    dict(targets=[]), dict(targets=""), dict(targets=" , "),
], ids=repr)
def test_lora_config_rejects(kwargs):
    with pytest.raises(ConfigError):
        LoRAConfig(**kwargs)


def test_lora_config_defaults_and_comma_targets():
    cfg = LoRAConfig(targets="q, v")
    assert cfg.targets == ["q", "v"]
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rslora) == (4, 32.0, 0.0, False)
    assert cfg.scale == 8.0


def test_rslora_scale_is_alpha_over_sqrt_r():
    assert LoRAConfig(r=16, alpha=8, rslora=True).scale == pytest.approx(2.0)
    assert LoRAConfig(r=16, alpha=8).scale == pytest.approx(0.5)
    assert lora_scale(9, 6.0, rslora=True) == pytest.approx(2.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_applies_scale_times_BA(rslora):
    torch.manual_seed(0)
    W, b = torch.randn(12, 10), torch.randn(12)
    layer = LoRALinear(nn.Parameter(W.clone()), nn.Parameter(b.clone()), r=4, alpha=6, rslora=rslora)
    with torch.no_grad():
        layer.lora_B["all"].normal_()
    scale = 6 / math.sqrt(4) if rslora else 6 / 4
    assert layer.scale == pytest.approx(scale)
    x = torch.randn(3, 5, 10)
    A, B = layer.lora_A["all"].detach(), layer.lora_B["all"].detach()
    expected = x @ W.t() + b + scale * (x @ A.t() @ B.t())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_while_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Parameter(torch.randn(16, 16)), None, r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B["all"].normal_()
    x = torch.randn(4, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_fan_in_fan_out_equals_linear_layout():
    torch.manual_seed(0)
    W, b = torch.randn(48, 16), torch.randn(48)  # (out, in)
    slices = {"q": (0, 16), "v": (32, 48)}
    plain = LoRALinear(nn.Parameter(W.clone()), nn.Parameter(b.clone()), r=4, alpha=8, slices=slices)
    conv = LoRALinear(nn.Parameter(W.t().contiguous()), nn.Parameter(b.clone()), r=4, alpha=8, slices=slices,
                      fan_in_fan_out=True)
    assert (conv.in_features, conv.out_features) == (16, 48)
    with torch.no_grad():
        for n in slices:
            plain.lora_B[n].normal_()
            conv.lora_A[n].copy_(plain.lora_A[n])
            conv.lora_B[n].copy_(plain.lora_B[n])
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conv.delta_weight(), plain.delta_weight(), rtol=0, atol=0)
    plain.merge()
    conv.merge()
    torch.testing.assert_close(conv.weight.t(), plain.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-6, atol=1e-6)


def test_slice_outside_output_is_rejected():
    with pytest.raises(ConfigError, match="outside"):
        LoRALinear(nn.Parameter(torch.zeros(8, 4)), None, r=2, alpha=2, slices={"q": (4, 12)})


# --- state-dict keys and saved adapters ------------------------------------------------------

def test_state_dict_keeps_base_keys_and_adds_lora_keys(small_gpt2):
    base_keys = set(small_gpt2.state_dict())
    inject_lora(small_gpt2, LoRAConfig(r=4, targets=["q", "v", "mlp.fc"]))
    keys = set(small_gpt2.state_dict())
    assert "transformer.h.0.attn.c_attn.weight" in keys and "transformer.h.0.attn.c_attn.bias" in keys
    lora_keys = {f"transformer.h.{i}.attn.c_attn.lora.default.lora_{m}.{s}" for i in range(2) for m in "AB" for s in "qv"}
    lora_keys |= {f"transformer.h.{i}.mlp.c_fc.lora.default.lora_{m}.all" for i in range(2) for m in "AB"}
    assert keys == base_keys | lora_keys
    set_trainable(small_gpt2, "lora")
    assert set(trainable_state(small_gpt2)) == lora_keys  # what a checkpoint saves
    # a base checkpoint loads into the adapted model with no key surgery
    result = small_gpt2.load_state_dict({k: v for k, v in small_gpt2.state_dict().items() if k in base_keys},
                                        strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == lora_keys


def test_adapter_file_holds_exactly_lora_tensors_and_round_trips(tmp_path, small_gpt2):
    from safetensors.torch import load_file

    base_state = {k: v.clone() for k, v in small_gpt2.state_dict().items()}
    cfg = LoRAConfig(r=4, alpha=16, targets=["q", "v", "mlp.proj"])
    inject_lora(small_gpt2, cfg)
    randomize_lora_(small_gpt2, seed=7, std=0.3)
    ids = _ids(small_gpt2)
    with torch.no_grad():
        expected = small_gpt2(ids)
    save_adapter(small_gpt2, tmp_path / "adapter", cfg, base_model="small")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    layers = [n for n, _ in lora_layers(small_gpt2)]
    assert set(saved) == {f"base_model.model.{n}.lora_{w}.weight" for n in layers for w in "AB"}  # PEFT's keys
    fresh = GPT2(small_gpt2.config)
    fresh.load_state_dict(base_state)
    fresh.eval()
    loaded_cfg = load_adapter(fresh, tmp_path / "adapter")
    assert loaded_cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=0)
    merge_lora(small_gpt2)
    with pytest.raises(Exception, match="merged"):
        save_adapter(small_gpt2, tmp_path / "again", cfg, base_model="small")


# --- parameter report ------------------------------------------------------------------------

def test_parameter_report_gpt2_124m_qv_r4():
    with torch.device("meta"):  # counting needs shapes only
        model = GPT2(gpt2_124m_config())
    assert parameter_report(model).total == 124_439_808  # GPT-2 small, tied head counted once
    inject_lora(model, LoRAConfig(r=4, alpha=32, targets=["q", "v"]))
    set_trainable(model, "lora")
    report = parameter_report(model)
    assert report.trainable == 147_456  # 12 layers x 2 slices x (4*768 + 768*4)
    assert report.total == 124_587_264
    assert str(report) == "trainable: 147,456 / 124,587,264 (0.12%)"


def test_parameter_report_full_finetune(small_gpt2):
    set_trainable(small_gpt2, "full")
    report = parameter_report(small_gpt2)
    n = sum(p.numel() for p in small_gpt2.parameters())
    assert report.trainable == report.total == n
    assert report.percent == 100.0
    assert str(report) == f"trainable: {n:,} / {n:,} (100.00%)"
