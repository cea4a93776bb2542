"""DoRA against PEFT's definition, both ways: PEFT-made DoRA adapters load here and give PeftModel's
logits; ours load in PEFT and give ours; merge folds the magnitude in exactly; a DoRA adapter on a
base with other weights is warned about; the magnitude trains."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import rel_err
from family_models import hf_family_model, reinit_decoder_, token_ids, write_decoder

from loratune.adapters.lora import LoRAConfig, lora_layers, merge_lora, unmerge_lora
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.adapters.trainable import set_trainable
from loratune.models import load_model

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_decoder("llama", tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return write_decoder("phi3", tmp_path_factory.mktemp("phi3") / "base")


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _randomize_dora_(peft_or_ours, seed: int) -> None:
    """Non-zero A and B, and magnitudes moved 10% off the row norms, as training would leave them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_or_ours.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def _peft_dora(base, out, targets, seed=3):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(_hf(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_dora=True))
    _randomize_dora_(peft, seed)
    peft.eval()
    peft.save_pretrained(out)
    return peft


@pytest.mark.parametrize("case", ["llama", "phi3"])
def test_peft_made_dora_adapter_gives_peft_logits_here(case, llama, phi3, tmp_path):
    base = {"llama": llama, "phi3": phi3}[case]
    targets = ["qkv_proj", "o_proj"] if case == "phi3" else ["q_proj", "v_proj", "down_proj"]
    peft = _peft_dora(base, tmp_path / "adapter", targets)
    ours, _ = load_model(base)
    lora = load_adapter(ours, tmp_path / "adapter")
    assert lora.use_dora and all(m.update().use_dora for _, m in lora_layers(ours))
    ids = token_ids(seed=1)
    with torch.no_grad():
        expected, actual = peft(input_ids=ids).logits, ours(ids)
        with peft.disable_adapter():
            plain = peft(input_ids=ids).logits
    assert rel_err(expected, plain) > 1e-2, "the adapter must change the logits"
    assert rel_err(actual, expected) <= RTOL


def test_our_dora_adapter_loads_in_peft_with_our_logits(llama, tmp_path):
    from peft import PeftModel

    ours, _ = load_model(llama)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"], use_dora=True))
    ids = token_ids(seed=2)
    with torch.no_grad():
        before = ours(ids)
    _randomize_dora_(ours, seed=5)
    with torch.no_grad():
        actual = ours(ids)
    assert rel_err(actual, before) > 1e-2
    save_adapter(ours, tmp_path / "adapter", LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"],
                                                        use_dora=True), str(llama))
    peft = PeftModel.from_pretrained(_hf(llama), tmp_path / "adapter").eval()
    assert peft.peft_config["default"].use_dora
    with torch.no_grad():
        assert rel_err(actual, peft(input_ids=ids).logits) <= RTOL


def test_fresh_dora_adapter_changes_nothing_and_its_magnitude_trains(llama):
    ours, _ = load_model(llama)
    ids = token_ids(seed=2)
    with torch.no_grad():
        base = ours(ids)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, targets=["q", "v"], use_dora=True))
    set_trainable(ours, "lora")
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_magnitude") for n in names)
    out = ours(ids)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    _randomize_dora_(ours, seed=1)  # B non-zero: the magnitude's gradient is no longer trivially structured
    ours(ids).float().pow(2).mean().backward()
    grads = [p.grad for n, p in ours.named_parameters() if n.endswith("lora_magnitude")]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)


def test_dora_merge_equals_unmerged_and_peft_merge(llama, tmp_path):
    peft = _peft_dora(llama, tmp_path / "adapter", ["q_proj", "v_proj"])
    ours, _ = load_model(llama)
    load_adapter(ours, tmp_path / "adapter")
    ids = token_ids(seed=4)
    before = {n: m.weight.detach().clone() for n, m in lora_layers(ours)}
    with torch.no_grad():
        adapted = ours(ids)
        merge_lora(ours)
        merged = ours(ids)
    assert rel_err(merged, adapted) <= RTOL
    theirs = dict(peft.merge_and_unload().named_parameters())
    for name, layer in lora_layers(ours):
        assert rel_err(layer.weight, theirs[name + ".weight"]) <= RTOL, name
    unmerge_lora(ours)
    for name, layer in lora_layers(ours):
        torch.testing.assert_close(layer.weight, before[name], rtol=0, atol=1e-5)
    with torch.no_grad():
        assert rel_err(ours(ids), adapted) <= RTOL


def _load_warnings(base, adapter, caplog) -> list[str]:
    ours, _ = load_model(base)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loratune"):
        load_adapter(ours, adapter)
    return [r.getMessage() for r in caplog.records if "does not fit this base" in r.getMessage()]


def test_dora_adapter_on_another_base_is_warned_about(llama, tmp_path, caplog):
    other = tmp_path / "other"  # the same architecture and shapes, other weights of the same spread
    reinit_decoder_(hf_family_model("llama"), seed=9, std=0.08).save_pretrained(other)
    louder = tmp_path / "louder"  # other weights at twice the scale
    reinit_decoder_(hf_family_model("llama"), seed=9, std=0.16).save_pretrained(louder)
    ours, _ = load_model(llama)  # ours carry a fingerprint of the base's row norms: any other base is caught
    cfg = LoRAConfig(r=4, alpha=8, targets=["q", "v"], use_dora=True)
    inject_lora(ours, cfg)
    _randomize_dora_(ours, seed=2)
    save_adapter(ours, tmp_path / "ours", cfg, str(llama))
    assert _load_warnings(other, tmp_path / "ours", caplog) and not _load_warnings(llama, tmp_path / "ours", caplog)
    _peft_dora(llama, tmp_path / "peft", ["q_proj", "v_proj"])  # PEFT's: the magnitudes must roughly fit
    assert _load_warnings(louder, tmp_path / "peft", caplog) and not _load_warnings(llama, tmp_path / "peft", caplog)


def test_saving_dora_warns_that_vllm_cannot_serve_it(llama, tmp_path, caplog):
    ours, _ = load_model(llama)
    cfg = LoRAConfig(r=2, alpha=4, targets=["q"], use_dora=True)
    inject_lora(ours, cfg)
    with caplog.at_level(logging.WARNING, logger="loratune"):
        save_adapter(ours, tmp_path / "adapter", cfg, str(llama))
    assert any("vLLM" in r.getMessage() for r in caplog.records)


def test_gpt2_q_v_dora_slices_load_in_peft_as_whole_c_attn(tiny_ckpt, model, hf_model, tmp_path):
    """GPT-2's q and v slices of the fused, transposed c_attn with DoRA: PEFT reads the equivalent
    whole-c_attn adapter (one magnitude per c_attn row, k's included) and gives our logits."""
    from peft import PeftModel

    cfg = LoRAConfig(r=2, alpha=8, targets=["q", "v"], use_dora=True)
    inject_lora(model, cfg)
    _randomize_dora_(model, seed=8)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    save_adapter(model, tmp_path / "adapter", cfg, str(tiny_ckpt))
    peft = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        actual, expected = model.eval()(ids), peft(input_ids=ids).logits
        with peft.disable_adapter():
            plain = peft(input_ids=ids).logits
    assert rel_err(expected, plain) > 1e-2
    assert rel_err(actual, expected) <= RTOL
    again, _ = load_model(tiny_ckpt)
    load_adapter(again, tmp_path / "adapter")  # and back here, slices restored
    assert all(list(m.slices) == ["q", "v"] for _, m in lora_layers(again))
    with torch.no_grad():
        assert rel_err(again(ids), actual) <= RTOL
