"""LoRA numerics against references: Hugging Face PEFT, and hand-written W + scale * B A.

All in float32 on the tiny checkpoint; the tolerance is 1e-5 relative to the logits' magnitude.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PROMPT_IDS, randomize_lora_, rel_err
from loratune.adapters.lora import LoRAConfig, LoRALinear, adapters_disabled, lora_layers
from loratune.adapters.targets import inject_lora

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol = RTOL * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol)


def _ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.tensor([PROMPT_IDS]), torch.randint(0, 50257, (1, 7), generator=gen)], dim=1)


def _peft_model(hf_model, r: int, alpha: float, rslora: bool):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(target_modules=["c_attn"], r=r, lora_alpha=alpha, fan_in_fan_out=True, lora_dropout=0.0,
                     use_rslora=rslora, bias="none")
    return get_peft_model(hf_model, cfg).eval()


@pytest.mark.parametrize("ours_on", ["loratune-gpt2", "transformers-gpt2"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_whole_c_attn_lora_equals_peft(ours_on, rslora, tiny_ckpt, model, hf_model):
    from transformers import GPT2LMHeadModel

    r, alpha = 4, 12.0
    ours = model if ours_on == "loratune-gpt2" else GPT2LMHeadModel.from_pretrained(tiny_ckpt).eval()
    inject_lora(ours, LoRAConfig(r=r, alpha=alpha, targets=["qkv"], rslora=rslora))
    randomize_lora_(ours, seed=11, std=0.5)
    peft = _peft_model(hf_model, r, alpha, rslora)
    layers = dict(lora_layers(ours))
    copied = 0
    with torch.no_grad():
        for name, module in peft.named_modules():
            if name.endswith("attn.c_attn") and hasattr(module, "lora_A"):
                ours_layer = layers[name[name.index("transformer."):]]
                assert module.scaling["default"] == pytest.approx(ours_layer.scale)
                module.lora_A["default"].weight.copy_(ours_layer.lora_A["all"])
                module.lora_B["default"].weight.copy_(ours_layer.lora_B["all"])
                copied += 1
    assert copied == 2
    ids = _ids()
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        actual = ours(ids)
        actual = actual if torch.is_tensor(actual) else actual.logits
        with peft.disable_adapter():
            base = peft(input_ids=ids).logits
    assert rel_err(expected, base) > 1e-3, "the adapter must matter for the comparison to mean anything"
    _close(actual, expected)


def test_q_v_slices_equal_hand_written_reference():
    torch.manual_seed(0)
    C, r, alpha = 16, 4, 8.0
    W, b = torch.randn(3 * C, C), torch.randn(3 * C)
    layer = LoRALinear(nn.Parameter(W.clone()), nn.Parameter(b.clone()), r=r, alpha=alpha,
                       slices={"q": (0, C), "v": (2 * C, 3 * C)})
    with torch.no_grad():
        for p in layer.lora_B.values():
            p.normal_()
    A = {n: layer.lora_A[n].detach() for n in "qv"}
    B = {n: layer.lora_B[n].detach() for n in "qv"}
    scale = alpha / r
    delta = torch.cat([B["q"] @ A["q"], torch.zeros(C, C), B["v"] @ A["v"]])  # (3C, C): k untouched
    W_eff = W + scale * delta
    x = torch.randn(2, 5, C)
    expected = F.linear(x, W_eff, b)
    _close(layer(x), expected)
    torch.testing.assert_close(layer(x)[..., C:2 * C], F.linear(x, W, b)[..., C:2 * C], rtol=0, atol=0)
    _close(layer.delta_weight(), scale * delta)


def test_q_v_model_equals_transformers_with_merged_c_attn(model, hf_model):
    cfg = LoRAConfig(r=4, alpha=32, targets=["q", "v"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=4, std=0.3)
    C = model.config.n_embd
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            layer = block.attn.c_attn
            A, B = layer.lora_A, layer.lora_B
            delta = torch.cat([B["q"] @ A["q"], torch.zeros(C, C), B["v"] @ A["v"]])  # (3C, C) as (out, in)
            w_eff = layer.weight + cfg.scale * delta
            hf_model.transformer.h[i].attn.c_attn.weight.copy_(w_eff.t())  # Conv1D stores (in, out)
    ids = _ids()
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = model(ids)
        with adapters_disabled(model):
            base = model(ids)
    assert rel_err(expected, base) > 1e-3
    _close(actual, expected)
