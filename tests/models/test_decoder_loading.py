"""Loading Llama-style checkpoints: every family's config read as transformers reads it, and every
config or checkpoint the decoder cannot honour refused by name, with nothing half-loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from family_models import save_family
from loratune.errors import CheckpointError
from loratune.models import load_model
from loratune.models.registry import FAMILIES


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3")
    save_family("qwen3", d)
    return d


def _copy(src, dest, config_edit=None, state_edit=None):
    shutil.copytree(src, dest)
    if config_edit:
        config = json.loads((dest / "config.json").read_text())
        config_edit(config)
        (dest / "config.json").write_text(json.dumps(config))
    if state_edit:
        state = load_file(dest / "model.safetensors")
        state_edit(state)
        save_file(state, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="mamba", architectures=["MambaForCausalLM"]), "mamba.*MambaForCausalLM"),
    (lambda c: c.update(hidden_act="relu2"), "hidden_act 'relu2' is not supported"),
    (lambda c: c.update(rope_parameters={"rope_type": "ntk-by-parts", "rope_theta": 1e4}),
     "rope_type 'ntk-by-parts' is not supported"),
    (lambda c: c.update(layer_types=["chunked_attention"] * 3), "layer type 'chunked_attention' is not supported"),
    (lambda c: c.update(layer_types=["full_attention"]), "layer_types lists 1 layers"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (lambda c: c.update(num_hidden_layers=5, layer_types=None), "num_hidden_layers=5, but the weights hold 3 layers"),
    (lambda c: c.update(hidden_size=80), "has shape"),
    (lambda c: c.update(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    (lambda c: c.update(use_sliding_window=True, sliding_window=0, layer_types=["sliding_attention"] * 3),
     "sliding_window must be a positive integer"),
])
def test_configs_the_decoder_cannot_honour_are_named(tmp_path, qwen3_dir, edit, message):
    d = _copy(qwen3_dir, tmp_path / "ckpt", config_edit=edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(d)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.layers.1.self_attn.k_norm.weight"), "missing 1 tensors.*k_norm"),
    (lambda s: s.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}), "1 unexpected tensors"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(65)}), r"model.norm.weight has shape \(65,\)"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}), "expected floating point"),
])
def test_checkpoints_that_do_not_match_their_config_are_named(tmp_path, qwen3_dir, edit, message):
    d = _copy(qwen3_dir, tmp_path / "ckpt", state_edit=edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(d)


def test_gemma3_embedding_models_are_refused(tmp_path):
    d = tmp_path / "gemma"
    save_family("gemma3", d)
    _copy(d, tmp_path / "bidi", config_edit=lambda c: c.update(use_bidirectional_attention=True))
    with pytest.raises(CheckpointError, match="use_bidirectional_attention"):
        load_model(tmp_path / "bidi")


def test_bare_model_keys_and_saved_tied_head_load(tmp_path, qwen3_dir):
    """A checkpoint of the bare *Model (no 'model.' prefix), and a tied head saved anyway, load as
    transformers loads them."""
    def strip(state):
        for key in list(state):
            state[key.removeprefix("model.")] = state.pop(key)
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()
    d = _copy(qwen3_dir, tmp_path / "bare", config_edit=lambda c: c.update(tie_word_embeddings=True),
              state_edit=strip)
    model, _ = load_model(d)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - {"gpt2"}))
def test_every_preset_builds_and_round_trips_its_config(model_type):
    """init-model's presets make valid configs, and config_to_hf -> config_from_hf gives the same config."""
    family = FAMILIES[model_type]
    for name, preset in family.presets.items():
        config = family.config_from_hf({"model_type": model_type, **preset})
        again = family.config_from_hf(json.loads(json.dumps(family.config_to_hf(config))))
        assert again == config, name


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3", "phi3-longrope"])
def test_our_config_json_is_read_by_transformers_as_the_same_model(tmp_path, name):
    """A config.json written by our family writer loads in transformers as the same architecture
    (same logits on the same weights)."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    hf = save_family(name, src)
    ours, _ = load_model(src)
    out = tmp_path / "ours"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(ours.family.config_to_hf(ours.config)))
    shutil.copyfile(src / "model.safetensors", out / "model.safetensors")
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
