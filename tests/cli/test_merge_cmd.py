"""``loratune merge`` with several adapters (PEFT's add_weighted_adapter combinations, then merged) and
with QLoRA adapters (merged into the dequantized 4-bit base they were trained against, the logit
difference reported; the original weights only when asked, with a warning)."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import rel_err
from family_models import token_ids, write_decoder

from loratune.adapters.lora import LoRAConfig
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.cli import main
from loratune.models import load_model
from loratune.quant.model import QuantConfig, quantize_model

RTOL = 1e-5
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted:UserWarning")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_decoder("llama", tmp_path_factory.mktemp("llama") / "base")


def _peft_adapter(base, out, seed, r, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=r, lora_alpha=2 * r,
                                                                                  target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft.save_pretrained(out)


@pytest.mark.parametrize("how, extra", [("cat", []), ("svd", ["--svd-rank", "6"]),
                                        ("ties", ["--density", "0.5"])])
def test_several_adapters_merge_like_peft(how, extra, llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _peft_adapter(llama, tmp_path / "a", 1, 4, ["q_proj", "v_proj"])
    _peft_adapter(llama, tmp_path / "b", 2, 4, ["q_proj", "v_proj"])
    args = ["merge", "--model", str(llama), "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b"),
            "--weights", "0.7,0.3", "--combine", how, *extra, "--out", str(tmp_path / "merged")]
    assert main(args) == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "a", adapter_name="a")
    peft.load_adapter(tmp_path / "b", adapter_name="b")
    options = {"svd": {"svd_rank": 6}, "ties": {"density": 0.5}}.get(how, {})
    peft.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type=how, **options)
    peft.set_adapter("mix")
    ids = token_ids(seed=2)
    merged, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        expected = peft.eval()(input_ids=ids).logits
        assert rel_err(merged(ids), expected) <= RTOL


def test_weights_that_do_not_fit_are_exit_2(llama, tmp_path, capsys):
    _peft_adapter(llama, tmp_path / "a", 1, 4, ["q_proj"])
    code = main(["merge", "--model", str(llama), "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "a"),
                 "--weights", "1", "--out", str(tmp_path / "m")])
    assert code == 2 and "one per --adapter" in capsys.readouterr().err


def _qlora_adapter(base, out, init="default"):
    """An adapter 'trained' against the NF4 base: non-zero A and B, the base's quantization recorded."""
    model, _ = load_model(base)
    cfg = LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"], init=init)
    inject_lora(model, cfg)
    quant = QuantConfig()
    quantize_model(model, quant)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        reference = model(token_ids(seed=3))
    save_adapter(model, out, cfg, str(base), base_quantization=quant.record())
    return reference


def test_qlora_adapter_merges_into_the_dequantized_base(llama, tmp_path, capsys, caplog):
    reference = _qlora_adapter(llama, tmp_path / "adapter")
    assert main(["merge", "--model", str(llama), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    said = capsys.readouterr().out
    assert "into the dequantized 4-bit base" in said and "logits differ from the adapted 4-bit model" in said
    merged, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        good = rel_err(merged(token_ids(seed=3)), reference)
    assert good <= 1e-5  # float32 export: only the merge's rounding
    with caplog.at_level(logging.WARNING, logger="loratune"):
        assert main(["merge", "--model", str(llama), "--adapter", str(tmp_path / "adapter"), "--into", "original",
                     "--out", str(tmp_path / "original")]) == 0
    assert "not these weights" in caplog.text
    original, _ = load_model(tmp_path / "original")
    with torch.no_grad():
        bad = rel_err(original(token_ids(seed=3)), reference)
    assert bad > 100 * max(good, 1e-7)  # the quantization error the adapter never saw
    plain, _ = load_model(llama)
    load_adapter(plain, tmp_path / "adapter")  # loading onto the 16-bit base still works (with the same gap)


def test_a_pissa_qlora_adapter_merges_into_its_quantized_residual(llama, tmp_path, capsys):
    """PiSSA under QLoRA quantizes the residual W - s B0 A0 and trains on it; the adapter is saved converted for
    the original base, and the merge rebuilds that residual, quantizes it as training did and adds the trained part."""
    reference = _qlora_adapter(llama, tmp_path / "adapter", init="pissa")
    assert main(["merge", "--model", str(llama), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert rel_err(merged(token_ids(seed=3)), reference) <= 1e-5


def test_generating_with_a_qlora_adapter_on_the_16_bit_base_warns(llama, tmp_path, caplog):
    from family_models import write_small_tokenizer

    write_small_tokenizer(llama)
    _qlora_adapter(llama, tmp_path / "adapter")
    with caplog.at_level(logging.WARNING, logger="loratune"):
        assert main(["generate", "--model", str(llama), "--adapter", str(tmp_path / "adapter"), "--prompt", "the cat",
                     "--max-new-tokens", "2"]) == 0
    assert "trained against a nf4-quantized base" in caplog.text
