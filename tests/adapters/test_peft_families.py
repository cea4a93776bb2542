"""PEFT adapters on the Llama-style families (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3, SmolLM3), both ways.

Each family's tiny checkpoint (tests/family_models.py: GQA, sliding windows, qkv bias, q/k norms,
fused projections, soft-capping, rope scalings, tied and untied heads) is written by transformers.
Adapters PEFT makes on the transformers model load here through ``load_adapter`` (what generate,
eval and merge use) and give ``PeftModel``'s logits; adapters saved here give ours in
``PeftModel.from_pretrained``; both to 1e-5 relative, in float32. Phi-3's q and v slices of the
fused ``qkv_proj`` go out as the exactly equivalent whole-``qkv_proj`` adapter with their real
grouped-query widths. An adapter for another family or size is refused, the model left as it was.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_, rel_err
from family_models import CASES, checkpoint_maker, token_ids
from safetensors.torch import load_file

from loratune.adapters.lora import LoRAConfig, adapters_disabled, lora_layers
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.errors import CheckpointError
from loratune.models import load_model

RTOL = 1e-5
MIN_EFFECT = 1e-2  # the adapter must move the logits at least this much for a comparison to mean something
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """case name (and config overrides) -> a tiny checkpoint directory, written once per module."""
    return checkpoint_maker(tmp_path_factory)


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _fused(hf) -> bool:
    return any(name.endswith(".qkv_proj") for name, _ in hf.named_modules())


def _peft_lora_modules(peft_model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert rel_err(actual, expected) <= RTOL, rel_err(actual, expected)


def _assert_same_layers(ours: torch.nn.Module, peft_model) -> None:
    """The same modules adapted, with the same total rank (PEFT's view) and the same scale."""
    theirs = _peft_lora_modules(peft_model)
    layers = dict(lora_layers(ours))
    assert set(layers) == set(theirs) and layers
    for name, layer in layers.items():
        assert layer.scale == pytest.approx(theirs[name].scaling["default"], rel=1e-12), name
        assert len(layer.slices) * layer.r == theirs[name].r["default"], name


def _compare(ours: torch.nn.Module, peft_model) -> None:
    """Ours equals PEFT with the adapter and without it, and the adapter matters."""
    ids = token_ids(seed=1)
    with torch.no_grad():
        expected, actual = peft_model(input_ids=ids).logits, ours(ids)
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        with adapters_disabled(ours):
            _close(ours(ids), base)
    assert rel_err(expected, base) > MIN_EFFECT, "the adapter must change the logits"
    _close(actual, expected)


# --- in: made by PEFT on the transformers model, loaded here ------------------------------------------

def _peft_adapter(base: Path, out: Path, seed: int = 0, **lora_kwargs):
    """A PEFT adapter made the way PEFT users do, with seeded non-zero A and B; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    hf = _hf(base)
    qv = ["qkv_proj"] if _fused(hf) else ["q_proj", "v_proj"]  # Phi-3 has no q_proj of its own in transformers
    kwargs = {"r": 4, "lora_alpha": 12, "lora_dropout": 0.0, "target_modules": qv}
    peft = get_peft_model(hf, LoraConfig(**{**kwargs, **lora_kwargs}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in _peft_lora_modules(peft).values():
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
            A.copy_(torch.randn(A.shape, generator=gen) * 0.05)
            B.copy_(torch.randn(B.shape, generator=gen) * 0.05)
    peft.eval()
    peft.save_pretrained(out)
    return peft


IN_CASES = {
    "q,v": {},
    "all-linear": {"target_modules": "all-linear"},
    "rslora q,v": {"use_rslora": True},
}


@pytest.mark.parametrize("case", IN_CASES)
@pytest.mark.parametrize("name", CASES)
def test_peft_made_adapter_gives_peft_logits_here(name, case, checkpoint, tmp_path):
    base = checkpoint(name)
    peft = _peft_adapter(base, tmp_path / "adapter", seed=7, **IN_CASES[case])
    ours, _ = load_model(base)
    lora = load_adapter(ours, tmp_path / "adapter", base_model=str(base))
    theirs = peft.peft_config["default"]
    assert (lora.r, lora.alpha, lora.rslora) == (theirs.r, theirs.lora_alpha, theirs.use_rslora)
    _assert_same_layers(ours, peft)
    _compare(ours, peft)


# --- out: made here, read by PEFT -----------------------------------------------------------------------

OUT_CASES = {
    "q,v": {"targets": ["q", "v"]},
    "q_proj,v_proj": {"targets": ["q_proj", "v_proj"]},
    "all-linear": {"targets": ["all-linear"]},
    "rslora q,v": {"targets": ["q", "v"], "rslora": True},
}


@pytest.mark.parametrize("case", OUT_CASES)
@pytest.mark.parametrize("name", CASES)
def test_our_adapter_gives_our_logits_in_peft(name, case, checkpoint, tmp_path):
    from peft import PeftModel

    base = checkpoint(name)
    ours, _ = load_model(base)
    cfg = LoRAConfig(r=4, alpha=12, **OUT_CASES[case])
    inject_lora(ours, cfg)
    randomize_lora_(ours, seed=3, std=0.1)
    save_adapter(ours, tmp_path / "adapter", cfg, base_model=str(base))
    peft = PeftModel.from_pretrained(_hf(base), tmp_path / "adapter").eval()
    _assert_same_layers(ours, peft)
    _compare(ours, peft)
    fresh, _ = load_model(base)  # and it loads back here as it was saved
    assert load_adapter(fresh, tmp_path / "adapter") == cfg
    assert {n: m.slices for n, m in lora_layers(fresh)} == {n: m.slices for n, m in lora_layers(ours)}
    with torch.no_grad():
        torch.testing.assert_close(fresh(token_ids()), ours(token_ids()), rtol=0, atol=0)


def test_phi3_slices_export_as_the_equivalent_fused_adapter(checkpoint, tmp_path):
    """q and v of qkv_proj (q 4 heads wide, k and v 2 each) and up of gate_up_proj: PEFT's whole-module
    adapters with A stacked, B block-shaped with zero rows for k (and gate), alpha scaled to keep the scale."""
    from peft import PeftModel

    base = checkpoint("phi3")
    ours, _ = load_model(base)
    c = ours.config
    q, kv, F = c.q_width, c.kv_width, c.intermediate_size
    assert q == 2 * kv, "grouped-query widths: q wider than k and v"
    cfg = LoRAConfig(r=4, alpha=12, targets=["q", "v", "up"])
    inject_lora(ours, cfg)
    randomize_lora_(ours, seed=5, std=0.1)
    out = save_adapter(ours, tmp_path / "adapter", cfg, base_model=str(base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["gate_up_proj", "qkv_proj"]
    tensors = load_file(out / "adapter_model.safetensors")
    for i, layer in enumerate(ours.model.layers):
        qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
        assert qkv.slices == {"q": (0, q), "v": (q + kv, q + 2 * kv)} and gate_up.slices == {"up": (F, 2 * F)}
        key = f"base_model.model.model.layers.{i}.self_attn.qkv_proj.lora_{{}}.weight"
        A, B = tensors[key.format("A")], tensors[key.format("B")]
        expected_B = torch.zeros(q + 2 * kv, 8)
        expected_B[:q, :4], expected_B[q + kv:, 4:] = qkv.lora_B["q"], qkv.lora_B["v"]  # k rows stay zero
        assert torch.equal(A, torch.cat([qkv.lora_A["q"], qkv.lora_A["v"]])) and torch.equal(B, expected_B)
        key = f"base_model.model.model.layers.{i}.mlp.gate_up_proj.lora_{{}}.weight"
        A, B = tensors[key.format("A")], tensors[key.format("B")]
        assert torch.equal(A, gate_up.lora_A["up"]) and torch.equal(B[F:], gate_up.lora_B["up"])
        assert not B[:F].any(), "gate rows stay zero"
    peft = PeftModel.from_pretrained(_hf(base), out).eval()
    modules = _peft_lora_modules(peft)
    for i in range(c.num_hidden_layers):  # rank 2r, alpha 2 alpha on qkv_proj; r, alpha on gate_up_proj
        qkv, gate_up = (modules[f"model.layers.{i}.{m}"] for m in ("self_attn.qkv_proj", "mlp.gate_up_proj"))
        assert (qkv.r["default"], gate_up.r["default"]) == (8, 4)
        assert qkv.scaling["default"] == pytest.approx(gate_up.scaling["default"]) == pytest.approx(cfg.scale)
    _compare(ours, peft)


# --- bad input: refused by name, the model left as it was ---------------------------------------------

def _refused(model, adapter: Path, match: str) -> str:
    """load_adapter raises a CheckpointError matching ``match``; no LoRA layer is left, the logits unchanged."""
    ids = token_ids()
    with torch.no_grad():
        before = model(ids)
    with pytest.raises(CheckpointError, match=match) as info:
        load_adapter(model, adapter)
    assert not list(lora_layers(model)), "a failed load must not leave the model half adapted"
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    return str(info.value)


def _our_adapter(model, out: Path, base: Path) -> Path:
    cfg = LoRAConfig(r=4, alpha=12, targets=["q", "v"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=9, std=0.1)
    return save_adapter(model, out, cfg, base_model=str(base))


@pytest.mark.parametrize("made_by", ["loratune", "peft"])
def test_adapter_for_another_family_of_the_same_shapes_is_refused(made_by, checkpoint, tmp_path):
    """Qwen3 (head_dim 16 here) and Llama share module names and every tensor shape: only the family tells."""
    qwen3, llama = checkpoint("qwen3", head_dim=16), checkpoint("llama")
    shapes = [{k: v.shape for k, v in load_model(d)[0].state_dict().items() if k.endswith("proj.weight")}
              for d in (qwen3, llama)]
    assert shapes[0] == shapes[1]
    if made_by == "loratune":
        adapter, source = _our_adapter(load_model(qwen3)[0], tmp_path / "adapter", qwen3), "loratune_adapter.json"
    else:
        adapter, source = tmp_path / "adapter", str(qwen3 / "config.json")
        _peft_adapter(qwen3, adapter)
    message = _refused(load_model(llama)[0], adapter, "is an adapter for a Qwen3 model")
    assert message == (f"{adapter} is an adapter for a Qwen3 model (model_type 'qwen3' in {source}), but this "
                       "model is a Llama ('llama'): its update means nothing here. Load it onto the Qwen3 model it "
                       "was trained on, or train an adapter for this Llama model")


def test_gpt2_adapter_onto_llama_is_refused(checkpoint, tiny_ckpt, tmp_path):
    llama = load_model(checkpoint("llama"))[0]
    ours = _our_adapter(load_model(tiny_ckpt)[0], tmp_path / "ours", tiny_ckpt)
    _refused(llama, ours, r"is an adapter for a GPT-2 model \(model_type 'gpt2' in loratune_adapter.json\), but "
                          r"this model is a Llama")
    (ours / "loratune_adapter.json").unlink()  # as PEFT would save it from a hub id: nothing names the family
    config = json.loads((ours / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "openai-community/gpt2"
    (ours / "adapter_config.json").write_text(json.dumps(config))
    _refused(llama, ours, r"adapter targets modules this model does not have: transformer\.h\.0\.attn\.c_attn, "
                          r"transformer\.h\.1\.attn\.c_attn; it was made for another architecture \(adapter_config "
                          r"names 'openai-community/gpt2'\): load it onto the model it was trained on")


@pytest.mark.parametrize("name, layer, shapes", [
    ("llama", "model.layers.0.self_attn.q_proj", r"A \(4, 32\), B \(32, 4\); this model's layer is 64 -> 64"),
    ("phi3", "model.layers.0.self_attn.qkv_proj", r"A \(8, 32\), B \(64, 8\); this model's layer is 64 -> 128"),
])
def test_adapter_for_another_size_of_the_family_is_refused(name, layer, shapes, checkpoint, tmp_path):
    small = checkpoint(name, hidden_size=32, intermediate_size=48)
    adapter = _our_adapter(load_model(small)[0], tmp_path / "adapter", small)
    _refused(load_model(checkpoint(name))[0], adapter,
             rf"adapter tensors for {layer} have shapes {shapes}: the adapter was made for a base model of another "
             rf"shape \(adapter_config names '{re.escape(str(small))}'\): load it onto that model")
