"""``loratune merge`` on the Llama-style families: a directory transformers loads as the base's own kind.

For every family (tests/family_models.py), an adapter on q, v, o, up and down (on Phi-3: the
q and v slices of ``qkv_proj`` and the up slice of ``gate_up_proj``) is merged by the CLI, and
``AutoModelForCausalLM`` reads the output with the logits of our unmerged model (1e-5 relative,
float32). config.json keeps every base field (rope scaling, sliding window, layer types, tied head,
dtype), generation_config.json is the base's byte for byte, and a bfloat16 base comes out bfloat16.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_lora_, rel_err
from family_models import CASES, token_ids, write_decoder
from safetensors.torch import load_file

from loratune.adapters.lora import LoRAConfig, merge_lora
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.cli import main
from loratune.models import load_model

RTOL = 1e-5
CHANGED = {"torch_dtype", "loratune"}  # what a float32 merge of a float32 base may add to config.json
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "do_sample": True, "temperature": 0.6,
              "top_p": 0.9}
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")



def _auto(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _merge(base: Path, adapter: Path, out: Path, *extra: str) -> int:
    return main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), *extra])


def _config(path: Path, name: str = "config.json") -> dict:
    return json.loads((path / name).read_text(encoding="utf-8"))


def _our_adapter(base: Path, out: Path, seed: int = 31):
    """Our model of ``base`` with a random adapter on q, v, o, up and down, saved to ``out``; returns the model."""
    model, _ = load_model(base)
    cfg = LoRAConfig(r=4, alpha=12, targets=["q", "v", "o", "up", "down"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=seed, std=0.1)
    save_adapter(model, out, cfg, base_model=str(base))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def merged(request, tmp_path_factory) -> SimpleNamespace:
    """A family's base (with a generation_config.json of two eos ids and sampling defaults), our adapter with
    the model it came from (unmerged), and the CLI's merge of the two."""
    root = tmp_path_factory.mktemp(f"merge-{request.param}")
    base = write_decoder(request.param, root / "base")
    generation = {**_config(base, "generation_config.json"), **GENERATION}
    (base / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    ours = _our_adapter(base, root / "adapter")
    assert _merge(base, root / "adapter", root / "out") == 0
    return SimpleNamespace(base=base, adapter=root / "adapter", out=root / "out", ours=ours)


def test_transformers_loads_the_merge_with_our_logits(merged):
    hf = _auto(merged.out)
    assert [type(hf).__name__] == _config(merged.base)["architectures"]
    assert next(hf.parameters()).dtype == torch.float32
    reloaded, _ = load_model(merged.out)  # loratune reads its own export too
    merged_ours, _ = load_model(merged.base)
    load_adapter(merged_ours, merged.adapter)
    assert merge_lora(merged_ours) > 0
    ids = token_ids(seed=2)
    with torch.no_grad():
        actual, base = hf(ids).logits, _auto(merged.base)(ids).logits
        assert rel_err(actual, merged.ours(ids)) <= RTOL
        assert rel_err(actual, merged_ours(ids)) <= RTOL
        assert rel_err(reloaded(ids), merged_ours(ids)) <= RTOL
    assert rel_err(actual, base) > 1e-2, "the merged adapter must change the logits"


def test_config_json_keeps_every_base_field(merged):
    from transformers import AutoConfig

    base, out = _config(merged.base), _config(merged.out)
    assert {k: v for k, v in out.items() if k not in CHANGED} == base
    assert out["dtype"] == out["torch_dtype"] == "float32"
    features = {"rope_parameters", "tie_word_embeddings", "sliding_window", "layer_types", "dtype"} & set(base)
    assert {"rope_parameters", "tie_word_embeddings", "dtype"} <= features
    assert {k: out[k] for k in features} == {k: base[k] for k in features}
    theirs, ours = (AutoConfig.from_pretrained(p).to_dict() for p in (merged.base, merged.out))
    skip = CHANGED | {"_name_or_path"}
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in theirs.items() if k not in skip}


def test_generation_config_is_the_bases_byte_for_byte(merged):
    from transformers import GenerationConfig

    path = "generation_config.json"
    assert (merged.out / path).read_bytes() == (merged.base / path).read_bytes()
    gen = GenerationConfig.from_pretrained(merged.out)
    assert (gen.eos_token_id, gen.temperature, gen.do_sample) == ([2, 5], 0.6, True)


def test_weights_have_the_bases_names_and_shapes(merged):
    """The tensors transformers wrote for the base (a tied head left out), and no LoRA tensor."""
    ours, theirs = load_file(merged.out / "model.safetensors"), load_file(merged.base / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ("lm_head.weight" in ours) == (not _config(merged.base)["tie_word_embeddings"])


@pytest.mark.parametrize("name", CASES)
def test_merging_a_peft_adapter_equals_peft_merge_and_unload(name, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = write_decoder(name, tmp_path / "base")
    peft = get_peft_model(_auto(base), LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", use_rslora=True))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in peft.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft.save_pretrained(tmp_path / "adapter")
    assert _merge(base, tmp_path / "adapter", tmp_path / "out") == 0
    reference = peft.merge_and_unload().eval()
    ids = token_ids(seed=3)
    with torch.no_grad():
        expected = reference(ids).logits
        assert rel_err(expected, _auto(base)(ids).logits) > 1e-2
        assert rel_err(_auto(tmp_path / "out")(ids).logits, expected) <= RTOL


def test_a_bfloat16_base_is_merged_in_float32_and_written_bfloat16(tmp_path):
    base = write_decoder("qwen3", tmp_path / "base", dtype=torch.bfloat16)
    assert _config(base)["dtype"] == "bfloat16"
    model = _our_adapter(base, tmp_path / "adapter")
    assert merge_lora(model) > 0  # loaded in float32 (--dtype's default), merged in float32
    assert _merge(base, tmp_path / "adapter", tmp_path / "out") == 0
    config, written = _config(tmp_path / "out"), load_file(tmp_path / "out" / "model.safetensors")
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    expected = {k: v.to(torch.bfloat16) for k, v in model.to_hf_state_dict().items()}
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert next(_auto(tmp_path / "out").parameters()).dtype == torch.bfloat16
    assert _merge(base, tmp_path / "adapter", tmp_path / "fp32", "--out-dtype", "float32") == 0
    assert _config(tmp_path / "fp32")["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "fp32" / "model.safetensors").values())


def test_without_a_base_generation_config_bos_and_eos_come_from_config_json(tmp_path):
    base = write_decoder("mistral", tmp_path / "base", eos_token_id=[2, 7])
    (base / "generation_config.json").unlink()
    _our_adapter(base, tmp_path / "adapter")
    assert _merge(base, tmp_path / "adapter", tmp_path / "out") == 0
    assert _config(tmp_path / "out", "generation_config.json") == {"bos_token_id": 1, "eos_token_id": [2, 7]}


def test_merging_an_adapter_for_another_family_writes_nothing(tmp_path, capsys):
    llama, gemma = write_decoder("llama", tmp_path / "llama"), write_decoder("gemma3", tmp_path / "gemma")
    _our_adapter(gemma, tmp_path / "adapter")
    capsys.readouterr()
    assert _merge(llama, tmp_path / "adapter", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and (f"loratune merge: error: {tmp_path / 'adapter'} is an adapter for a Gemma 3 "
                                       "model (model_type 'gemma3_text' in loratune_adapter.json), but this model is "
                                       "a Llama ('llama')") in err
    assert not (tmp_path / "out").exists()
