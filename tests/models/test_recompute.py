"""loratune/models/recompute.py: recomputing each block in backward changes memory, not results.

With a fully frozen base and only LoRA trainable, the loss and every LoRA gradient with
checkpointing equal those without (GPT-2 with dropout, so the recomputation must draw the same
masks; Llama-style decoders, packed rows included); full fine-tuning too. The reentrant variant's
failure with a frozen base (no gradient reaches the adapter) is shown next to ours. Evaluation,
``no_grad`` and generation never checkpoint. The recipe fields parse, validate and reach the model.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import loratune.models.recompute as recompute_module
from conftest import randomize_lora_, reinit_
from family_models import BASE, CASES, reinit_decoder_
from loratune.adapters.lora import LoRAConfig, lora_layers
from loratune.adapters.targets import inject_lora
from loratune.adapters.trainable import set_trainable
from loratune.errors import ConfigError
from loratune.generate.sampling import SamplingConfig, generate
from loratune.models import GPT2, GPT2Config
from loratune.models.recompute import block_policy, run_layers, set_activation_checkpointing
from loratune.models.registry import family_for_config
from loratune.recipe import load_recipe
from loratune.train.loss import lm_loss_sum

GRAD_TOL = dict(rtol=0, atol=1e-6)  # fp32; the recomputation repeats the same ops, so it is exact on CPU
V = 97


def _gpt2(finetune: str = "lora", dropout: float = 0.1) -> GPT2:
    """A 3-block GPT-2 with dropout everywhere (embeddings, attention, residuals, the adapter's input)."""
    torch.manual_seed(0)
    model = reinit_(GPT2(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=64, vocab_size=V, dropout=dropout)),
                    seed=1)
    if finetune == "lora":
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, targets=["q", "v", "attn.out", "mlp.fc"]))
        randomize_lora_(model, seed=2, std=0.5)  # B != 0: A's gradients are not zero either
    set_trainable(model, finetune)
    return model.train()


def _decoder(case: str = "llama", finetune: str = "lora"):
    """A Llama-style model of family_models' case (3 layers of 64, grouped-query attention)."""
    import transformers

    config_cls, _, extra = CASES[case]
    hf = getattr(transformers, config_cls)(**{**BASE, **extra, "vocab_size": V}).to_dict()
    family = family_for_config(hf)
    torch.manual_seed(0)
    model = reinit_decoder_(family.build(family.config_from_hf(hf)), seed=1)
    if finetune == "lora":
        inject_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o"]))
        randomize_lora_(model, seed=2, std=0.5)
    set_trainable(model, finetune)
    return model.train()


def _data(B: int = 2, T: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def _packed_positions(lengths: list[list[int]]) -> torch.Tensor:
    """position_ids of packed rows: each example counts from 0."""
    return torch.tensor([[i for n in row for i in range(n)] for row in lengths])


def _loss_and_grads(model, ids, labels, position_ids=None, on: bool = False, seed: int = 0):
    set_activation_checkpointing(model, on)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    loss = lm_loss_sum(model, ids, labels, position_ids) / labels.numel()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(model, ids, labels, position_ids=None) -> dict[str, torch.Tensor]:
    """Loss and every trainable gradient equal with and without checkpointing; returns the gradients."""
    loss_off, off = _loss_and_grads(model, ids, labels, position_ids, on=False)
    loss_on, on = _loss_and_grads(model, ids, labels, position_ids, on=True)
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)  # the forward is the same computation
    assert on.keys() == off.keys() and off
    for name in off:
        torch.testing.assert_close(on[name], off[name], **GRAD_TOL, msg=name)
    assert min(g.abs().max().item() for g in off.values()) > 1e-3  # every gradient is well above the tolerance
    return off


# --- the same loss and gradients ---------------------------------------------------------------

def test_gpt2_lora_gradients_equal_with_dropout():
    model = _gpt2()
    ids, labels = _data()
    grads = _assert_same(model, ids, labels)
    assert all("lora" in n for n in grads)  # only the adapter trains
    # the dropout masks matter: another seed gives other gradients, so equality means the
    # recomputation drew the same masks (the RNG state was restored)
    _, other = _loss_and_grads(model, ids, labels, on=False, seed=1)
    assert max((other[n] - grads[n]).abs().max().item() for n in grads) > 100 * GRAD_TOL["atol"]


def test_gpt2_packed_rows_and_full_fine_tuning():
    ids, labels = _data(T=32)
    positions = _packed_positions([[10, 14, 8], [20, 12]])
    _assert_same(_gpt2(), ids, labels, positions)
    grads = _assert_same(_gpt2("full"), ids, labels, positions)
    assert "transformer.wte.weight" in grads and "transformer.h.0.mlp.c_fc.weight" in grads


@pytest.mark.parametrize("case", ["llama", "gemma3"])  # gemma3: sliding and full layers, sandwich norms, soft-cap
def test_decoder_lora_gradients_equal(case):
    model = _decoder(case)
    ids, labels = _data()
    _assert_same(model, ids, labels)
    _assert_same(model, ids, labels, _packed_positions([[16, 24], [40]]))  # packed rows: the _packed loop


def test_decoder_full_fine_tuning_gradients_equal():
    grads = _assert_same(_decoder("llama", "full"), *_data())
    assert "model.embed_tokens.weight" in grads and "model.layers.2.mlp.down_proj.weight" in grads


# --- the failure it avoids ---------------------------------------------------------------------

def test_the_reentrant_variant_loses_the_adapter_gradients_and_ours_does_not():
    """A frozen base: the block's input (the embedding output) does not require grad. The reentrant
    checkpoint's output then does not either, and no gradient reaches LoRA inside the block."""
    model = _gpt2(dropout=0.0)
    ids, _ = _data()
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))[None]  # (B, T, C)
    assert not x.requires_grad
    block = model.transformer.h[0]
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        lost = checkpoint(block, x, None, None, use_reentrant=True)
    assert not lost.requires_grad  # backward cannot even start: the adapter would get nothing

    ours = run_layers([block], x, None, None, recompute=True)
    ours.square().sum().backward()
    b = block.attn.c_attn.lora_B["q"]
    assert b.grad is not None and b.grad.abs().max() > 0


def test_lora_B_gets_gradients_from_the_first_step():
    """A fresh adapter (B = 0, so A's gradient is 0 at first): B gets a gradient at step 1, A at step 2."""
    torch.manual_seed(0)
    model = reinit_(GPT2(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=64, vocab_size=V)), seed=1)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "v"]))
    set_trainable(model, "lora")
    set_activation_checkpointing(model.train(), True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = _data()
    for step in (1, 2):
        opt.zero_grad(set_to_none=True)
        (lm_loss_sum(model, ids, labels) / labels.numel()).backward()
        for name, layer in lora_layers(model):
            for part in layer.slices:
                B, A = layer.lora_B[part], layer.lora_A[part]
                assert B.grad is not None and B.grad.abs().max() > 0, (name, part, step)
                assert A.grad is not None and (A.grad.abs().max() > 0) == (step == 2), (name, part, step)
        opt.step()


# --- only while training -----------------------------------------------------------------------

def _count_recomputes(monkeypatch) -> list:
    calls = []
    real = recompute_module._recompute_in_backward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)
    monkeypatch.setattr(recompute_module, "_recompute_in_backward", counting)
    return calls


def test_recompute_only_in_training_with_grad_and_no_cache(monkeypatch):
    calls = _count_recomputes(monkeypatch)
    model = _gpt2()
    set_activation_checkpointing(model, True)
    ids, _ = _data(T=16)
    model(ids)
    assert calls == [False] * 3  # one per block, non-reentrant
    calls.clear()
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids)
    model.train()
    model(ids, cache=model.new_cache(2, 32))  # a cache: generation's path, even in train mode
    assert calls == []
    assert block_policy(model, None) == {"recompute": True, "offload": False}
    assert block_policy(model.eval(), None) == {"recompute": False, "offload": False}


def test_generation_is_unaffected(monkeypatch):
    model = _decoder("llama").eval()
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    before = generate(model, prompt, cfg)
    calls = _count_recomputes(monkeypatch)
    set_activation_checkpointing(model, True)
    assert torch.equal(generate(model, prompt, cfg), before) and calls == []


# --- switching it on ---------------------------------------------------------------------------

def test_offload_is_ignored_on_cpu_and_needs_checkpointing(caplog):
    model = _gpt2()
    with caplog.at_level(logging.WARNING, logger="loratune"):
        set_activation_checkpointing(model, True, offload=True, device="cpu")
    assert "activation_offload: ignored on cpu" in caplog.text
    assert model.activation_checkpointing and not model.activation_offload
    with pytest.raises(ConfigError, match="set activation_checkpointing: true too"):
        set_activation_checkpointing(model, False, offload=True)
    with pytest.raises(ConfigError, match="does not support activation checkpointing"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), True)


def test_recipe_fields_parse_and_validate():
    r = load_recipe(None, ["activation_checkpointing=true", "activation_offload=yes", "quantize=nf4",
                           "double_quant=false"])
    assert (r.activation_checkpointing, r.activation_offload, r.quantize, r.double_quant) == (True, True, "nf4", False)
    d = load_recipe(None)
    defaults = (d.activation_checkpointing, d.activation_offload, d.quantize, d.double_quant)
    assert defaults == (False, False, "none", True)
    bad = {("activation_checkpointing=maybe",): "activation_checkpointing: cannot read 'maybe' as bool",
           ("activation_offload=true",): "set activation_checkpointing: true too",
           ("quantize=fp4",): "quantize must be one of none, nf4, int8, gguf, got 'fp4'",
           ("quantize=int8", "finetune=full"): "use finetune: lora, or quantize: none",
           ("double_quant=2",): "double_quant: cannot read 2 as bool"}
    for overrides, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_recipe(None, list(overrides))


def test_setup_model_switches_it_on(ckpt, tmp_path):
    from loratune.train import setup_model

    recipe = load_recipe(None, [f"model={ckpt}", "device=cpu", "precision=fp32", f"out_dir={tmp_path}",
                                "activation_checkpointing=true"])
    model, _, _ = setup_model(recipe, torch.device("cpu"))
    assert model.activation_checkpointing and not model.activation_offload
    plain, _, _ = setup_model(load_recipe(None, [f"model={ckpt}", "device=cpu"]), torch.device("cpu"))
    assert not plain.activation_checkpointing
