"""A LoRA rank above a layer's min(in, out) is no longer low-rank (loratune/adapters/targets.py, lora.py).

New adapters (``inject_lora``) refuse it, naming the layer, its width and the rank that fits;
PEFT allows it, so a PEFT adapter with such a rank still loads, with a warning.
"""

from __future__ import annotations

import logging

import pytest
import torch

from loratune.adapters.lora import LoRAConfig, LoRALinear, lora_layers
from loratune.adapters.peft_format import load_adapter
from loratune.adapters.targets import inject_lora
from loratune.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
Q_SLICE = ("lora.r={r} exceeds transformer.h.0.attn.c_attn's q slice (in 64, out 64): a rank above min(in, out) "
           "is no longer low-rank; use r <= 64")


def test_a_rank_above_the_slice_width_is_refused_and_nothing_is_injected(model):
    with pytest.raises(ConfigError) as info:
        inject_lora(model, LoRAConfig(r=512, targets=["q", "v"]))
    assert str(info.value) == Q_SLICE.format(r=512)
    assert list(lora_layers(model)) == [], "the model is left untouched"


def test_the_full_width_is_still_allowed(model):
    names = inject_lora(model, LoRAConfig(r=64, targets=["q", "v"]))
    assert len(names) == 2 and all(m.r == 64 for _, m in lora_layers(model))


def test_a_whole_layer_names_its_in_and_out(model):
    with pytest.raises(ConfigError, match=r"^lora\.r=65 exceeds transformer\.h\.0\.mlp\.c_fc \(in 64, out 256\): "
                                          r".*use r <= 64$"):
        inject_lora(model, LoRAConfig(r=65, targets=["mlp.fc"]))


def test_the_narrowest_targeted_layer_is_named():
    """Layers of different widths: the rank suggested fits all of them (any nn.Module tree works)."""
    model = torch.nn.Sequential()
    model.add_module("wide", torch.nn.Linear(64, 256))
    model.add_module("narrow", torch.nn.Linear(256, 16))
    with pytest.raises(ConfigError, match=r"^lora\.r=32 exceeds narrow \(in 256, out 16\).*use r <= 16$"):
        inject_lora(model, LoRAConfig(r=32, targets=["wide", "narrow"]))
    assert inject_lora(model, LoRAConfig(r=16, targets=["wide", "narrow"])) == ["wide", "narrow"]


def test_transformers_conv1d_layers_are_measured_the_same_way(hf_model):
    """transformers stores GPT-2's projections transposed (Conv1D, weight (in, out))."""
    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.mlp\.c_proj \(in 256, out 64\).*use r <= 64$"):
        inject_lora(hf_model, LoRAConfig(r=65, targets=["mlp.c_proj"]))


def test_a_layer_built_directly_with_a_large_rank_warns(caplog):
    weight = torch.nn.Parameter(torch.zeros(8, 16))
    with caplog.at_level(logging.WARNING, logger="loratune"):
        LoRALinear(weight, None, r=12, alpha=12.0)
    assert [r.getMessage() for r in caplog.records] == [
        "LoRA rank 12 exceeds min(in, out) = 8 of this layer: the update is not low-rank"]


def test_a_peft_adapter_with_a_rank_above_the_width_still_loads(tiny_ckpt, model, tmp_path, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_ckpt),
                          LoraConfig(r=80, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_attn"]))
    peft.save_pretrained(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING, logger="loratune"):
        lora = load_adapter(model, tmp_path / "adapter")
    assert lora.r == 80 and all(m.r == 80 for _, m in lora_layers(model))
    assert any("LoRA rank 80 exceeds min(in, out) = 64" in r.getMessage() for r in caplog.records)
