"""PiSSA, OLoRA and Gaussian starts on a whole model (loratune/adapters/init.py, initialise): the output is
unchanged at step 0, and the saved adapter is the plain LoRA adapter of the *original* base (PEFT's
conversion), which PEFT and loratune load onto the unchanged checkpoint with our trained logits."""
from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora_, rel_err
from family_models import token_ids, write_decoder

from loratune.adapters.lora import LoRAConfig, lora_layers
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.errors import ConfigError
from loratune.models import load_model

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_decoder("llama", tmp_path_factory.mktemp("llama") / "base")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "gaussian"])
def test_start_keeps_the_output_and_saves_a_plain_adapter_of_the_original_base(init, llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours, _ = load_model(llama)
    ids = token_ids(seed=1)
    with torch.no_grad():
        before = ours(ids)
    cfg = LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"], init=init)
    inject_lora(ours, cfg)
    layer = dict(lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["all"].abs().max() > 0
    if init != "gaussian":
        assert layer.lora_B["all"].abs().max() > 0  # the top of the weight moved into the adapter
    with torch.no_grad():
        assert rel_err(ours(ids), before) <= RTOL
    randomize_lora_(ours, seed=3, std=0.2)  # as training would move them
    with torch.no_grad():
        trained = ours(ids)
    assert rel_err(trained, before) > 1e-2
    save_adapter(ours, tmp_path / "adapter", cfg, str(llama))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "adapter").eval()
    expected_r = 8 if init != "gaussian" else 4
    assert peft.peft_config["default"].r == expected_r
    with torch.no_grad():
        assert rel_err(peft(input_ids=ids).logits, trained) <= RTOL
    again, _ = load_model(llama)  # the original checkpoint, untouched
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(again(ids), trained) <= RTOL


def test_pissa_on_gpt2_slices_decomposes_each_slice(tiny_ckpt, model, tmp_path):
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    cfg = LoRAConfig(r=2, alpha=4, targets=["q", "v"], init="pissa")
    inject_lora(model, cfg)
    with torch.no_grad():
        assert rel_err(model(ids), before) <= RTOL
    randomize_lora_(model, seed=1, std=0.2)
    with torch.no_grad():
        trained = model(ids)
    save_adapter(model, tmp_path / "adapter", cfg, str(tiny_ckpt))
    again, _ = load_model(tiny_ckpt)
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(again(ids), trained) <= RTOL


def test_bad_init_names_are_config_errors():
    with pytest.raises(ConfigError, match="pissa"):
        LoRAConfig(init="svd")
    with pytest.raises(ConfigError):
        LoRAConfig(init="pissa_niter_x")


def test_pissa_dora_adapter_fits_the_original_base_and_leaves_nothing_in_an_export(llama, tmp_path, caplog):
    import logging

    from loratune.adapters.lora import merge_lora

    ours, _ = load_model(llama)
    cfg = LoRAConfig(r=4, alpha=8, targets=["q", "v"], init="pissa", use_dora=True)
    inject_lora(ours, cfg)
    randomize_lora_(ours, seed=2, std=0.2)
    save_adapter(ours, tmp_path / "adapter", cfg, str(llama))
    again, _ = load_model(llama)
    with caplog.at_level(logging.WARNING, logger="loratune"):
        load_adapter(again, tmp_path / "adapter")
    assert "does not fit" not in caplog.text  # fingerprinted on the original weights, not the residual
    merge_lora(ours)
    assert not [k for k in ours.to_hf_state_dict() if "lora" in k]
