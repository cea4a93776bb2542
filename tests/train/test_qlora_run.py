"""QLoRA through the one training loop: ``quantize: nf4`` stores the frozen base in 4 bits after the
adapter is injected, training lowers the validation loss, the saved adapter records the base it was
trained against, and DoRA, PiSSA, LoRA+ and activation checkpointing run with it."""

from __future__ import annotations

import json

import pytest
import torch

from loratune.adapters.lora import lora_layers
from loratune.adapters.trainable import parameter_report
from loratune.quant.model import base_bits, quantized_layers
from loratune.train import setup_model, train
from loratune.train.metrics import read_metrics
from test_train_families import _checkpoint, _recipe, data_file  # noqa: F401  (the fixture)


def _val_losses(run) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("val_loss") is not None]


def test_qlora_trains_and_records_its_base(tmp_path, data_file):  # noqa: F811
    d = _checkpoint(tmp_path, "llama")
    recipe = _recipe(d, data_file, tmp_path / "run", quantize="nf4", max_steps=12, eval_every=6)
    model, _, _ = setup_model(recipe, torch.device("cpu"))
    layers = quantized_layers(model)
    assert layers and all(m.quant is not None for _, m in lora_layers(model))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora." not in n)
    q_bits, _ = base_bits(model)
    assert 4.1 <= q_bits <= 4.5
    plain, _, _ = setup_model(_recipe(d, data_file, tmp_path / "plain"), torch.device("cpu"))
    assert parameter_report(model).total == parameter_report(plain).total  # the 4-bit weights still count
    train(recipe)
    losses = _val_losses(tmp_path / "run")
    assert len(losses) >= 2 and losses[-1] < losses[0]
    extra = json.loads((tmp_path / "run" / "adapter" / "loratune_adapter.json").read_text())
    assert extra["base_quantization"] == {"kind": "nf4", "block_size": 64, "double_quant": True}


@pytest.mark.parametrize("lora", [dict(use_dora=True), dict(init="pissa_niter_2"), dict(plus_ratio=16.0)],
                         ids=["dora", "pissa", "lora+"])
def test_qlora_variants_train(tmp_path, data_file, lora):  # noqa: F811
    d = _checkpoint(tmp_path, "llama")
    recipe = _recipe(d, data_file, tmp_path / "run", quantize="nf4", activation_checkpointing=True,
                     max_steps=8, eval_every=4)
    for k, v in lora.items():
        setattr(recipe.lora, k, v)
    train(recipe)
    losses = _val_losses(tmp_path / "run")
    assert losses[-1] < losses[0]


def test_bf16_qlora_keeps_float32_adapters_and_adds_beside_them(tmp_path, data_file):  # noqa: F811
    """bf16-true: what stays unquantized of the base is bf16, the adapters' masters float32; a second adapter on
    every linear of the quantized model wraps the quantized projections, never the base inside a LoRA layer."""
    from loratune.adapters import LoRAConfig, inject_lora
    from loratune.adapters.lora import LoRALinear

    d = _checkpoint(tmp_path, "llama")
    recipe = _recipe(d, data_file, tmp_path / "run", quantize="nf4", precision="bf16-true")
    model, _, _ = setup_model(recipe, torch.device("cpu"))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and ".lora." not in n}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    inject_lora(model, LoRAConfig(r=2, targets=["all-linear"]), adapter="second")
    nested = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)
              and any(isinstance(c, LoRALinear) for c in m.modules() if c is not m)]
    assert not nested
    assert all("second" in m.lora for _, m in lora_layers(model))
