"""loratune/adapters/targets.py: which projections a LoRA config adapts, on our GPT-2 and on transformers'."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_lora_, rel_err
from loratune.errors import TargetError
from loratune.adapters.lora import LoRAConfig, LoRALinear, lora_layers
from loratune.adapters.targets import inject_lora, resolve_targets

C = 32  # small_gpt2's width


def _adapted(model) -> dict[str, LoRALinear]:
    return dict(lora_layers(model))


def _layer_names(suffix: str, n_layer: int = 2) -> list[str]:
    return [f"transformer.h.{i}.{suffix}" for i in range(n_layer)]


def test_q_v_aliases_become_slices_of_c_attn(small_gpt2):
    names = inject_lora(small_gpt2, LoRAConfig(r=4, targets=["q", "v"]))
    assert names == _layer_names("attn.c_attn")
    layers = _adapted(small_gpt2)
    assert set(layers) == set(names)
    for layer in layers.values():
        assert layer.slices == {"q": (0, C), "v": (2 * C, 3 * C)}
        assert not layer.fan_in_fan_out
        assert layer.lora_B["q"].shape == (C, 4) and layer.lora_A["v"].shape == (4, C)


def test_slice_order_follows_the_fused_layout(small_gpt2):
    inject_lora(small_gpt2, LoRAConfig(r=2, targets=["v", "k", "q"]))
    layer = small_gpt2.transformer.h[1].attn.c_attn
    assert list(layer.slices.items()) == [("q", (0, C)), ("k", (C, 2 * C)), ("v", (2 * C, 3 * C))]


@pytest.mark.parametrize("alias, suffix, shape", [
    ("qkv", "attn.c_attn", (3 * C, C)),
    ("attn.out", "attn.c_proj", (C, C)),
    ("mlp.fc", "mlp.c_fc", (4 * C, C)),
    ("mlp.proj", "mlp.c_proj", (C, 4 * C)),
])
def test_whole_projection_aliases(small_gpt2, alias, suffix, shape):
    names = inject_lora(small_gpt2, LoRAConfig(r=4, targets=[alias]))
    assert names == _layer_names(suffix)
    for layer in _adapted(small_gpt2).values():
        assert tuple(layer.weight.shape) == shape
        assert list(layer.slices) == ["all"]
        assert layer.slices["all"] == (0, shape[0])


def test_suffix_targets_match_module_name_endings(small_gpt2):
    assert inject_lora(small_gpt2, LoRAConfig(targets=["c_fc"])) == _layer_names("mlp.c_fc")


def test_suffix_matches_whole_name_components_only(small_gpt2):
    # 'c_proj' is both attn.c_proj and mlp.c_proj; 'proj' alone is no module name
    plan = resolve_targets(small_gpt2, ["c_proj"])
    assert set(plan) == set(_layer_names("attn.c_proj") + _layer_names("mlp.c_proj"))
    with pytest.raises(TargetError, match="'proj'"):
        resolve_targets(small_gpt2, ["proj"])


def test_all_linear_excludes_the_output_head(small_gpt2):
    names = inject_lora(small_gpt2, LoRAConfig(targets=["all-linear"]))
    expected = {n for i in range(2) for n in (f"transformer.h.{i}.attn.c_attn", f"transformer.h.{i}.attn.c_proj",
                                              f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj")}
    assert set(names) == expected
    assert isinstance(small_gpt2.lm_head, torch.nn.Linear) and not isinstance(small_gpt2.lm_head, LoRALinear)


def test_regex_target_uses_fullmatch(small_gpt2):
    names = inject_lora(small_gpt2, LoRAConfig(targets=[r"re:transformer\.h\.1\.(attn|mlp)\.c_proj"]))
    assert names == ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(TargetError):  # fullmatch: a partial name matches nothing
        resolve_targets(small_gpt2, [r"re:c_fc"])
    with pytest.raises(TargetError, match="bad regex"):
        resolve_targets(small_gpt2, ["re:h.(0"])


def test_unknown_target_names_the_target_and_hints(small_gpt2):
    with pytest.raises(TargetError, match="'query_proj'") as info:
        inject_lora(small_gpt2, LoRAConfig(targets=["q", "query_proj"]))
    assert "c_attn" in str(info.value)  # the hint lists real module names
    assert not _adapted(small_gpt2), "a failed injection must leave the model untouched"


@pytest.mark.parametrize("targets", [["q", "qkv"], ["qkv", "v"], ["c_attn", "k"], ["k", "all-linear"]])
def test_whole_and_slice_on_one_module_conflict(small_gpt2, targets):
    with pytest.raises(TargetError, match="c_attn"):
        inject_lora(small_gpt2, LoRAConfig(targets=targets))
    assert not _adapted(small_gpt2)


def test_targeting_a_module_twice_whole_is_fine(small_gpt2):
    assert inject_lora(small_gpt2, LoRAConfig(targets=["qkv", "c_attn"])) == _layer_names("attn.c_attn")


def test_base_weight_is_shared_not_copied(small_gpt2):
    w = small_gpt2.transformer.h[0].attn.c_attn.weight
    inject_lora(small_gpt2, LoRAConfig(targets=["q", "v"]))
    assert small_gpt2.transformer.h[0].attn.c_attn.weight is w


# --- transformers' GPT-2 (Conv1D, weights stored (in, out)) ------------------------------------

def test_inject_into_transformers_gpt2(hf_model):
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262]])
    with torch.no_grad():
        before = hf_model(ids).logits
    names = inject_lora(hf_model, LoRAConfig(r=4, alpha=8, targets=["q", "v", "mlp.fc"]))
    assert names == _layer_names("attn.c_attn") + _layer_names("mlp.c_fc")
    layer = hf_model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (64, 192)
    assert layer.slices == {"q": (0, 64), "v": (128, 192)}
    assert "transformer.h.0.attn.c_attn.weight" in hf_model.state_dict()
    with torch.no_grad():
        after = hf_model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    randomize_lora_(hf_model, seed=1, std=0.5)
    with torch.no_grad():
        assert rel_err(hf_model(ids).logits, before) > 1e-3  # the adapter is really in the forward path


def test_all_linear_on_transformers_gpt2_skips_lm_head(hf_model):
    names = inject_lora(hf_model, LoRAConfig(targets=["all-linear"]))
    assert len(names) == 4 * 2
    assert not isinstance(hf_model.lm_head, LoRALinear)


# --- fused projections of unequal widths come from the family spec --------------------------------

class _GQAFused(torch.nn.Module):
    """A block with one fused qkv projection under grouped-query attention: q is 4 heads wide, k and
    v one head each, so the slices are 64, 16 and 16 wide, not thirds of 96."""

    def __init__(self, family) -> None:
        super().__init__()
        self.family, self.config = family, {"heads": 4, "kv_heads": 1, "head": 16}
        self.attn = torch.nn.ModuleDict({"qkv_proj": torch.nn.Linear(32, 96)})

    def forward(self, x):
        return self.attn["qkv_proj"](x)


def _gqa_spec():
    from loratune.models.spec import Alias, FamilySpec

    def spans(config):
        q, kv = config["heads"] * config["head"], config["kv_heads"] * config["head"]
        return {"attn.qkv_proj": {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}}

    return FamilySpec(model_type="gqa-test", display_name="GQA test", config_from_hf=dict, from_hf_state_dict=None,
                      build=None, aliases={n: Alias("attn.qkv_proj", n) for n in "qkv"}, fused_slices=spans,
                      memory_profile=None, eos_token=None, config_to_hf=None)


def test_slices_take_the_widths_the_family_spec_gives():
    model = _GQAFused(_gqa_spec())
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=["v", "q"]))
    layer = model.attn["qkv_proj"]
    assert layer.slices == {"q": (0, 64), "v": (80, 96)}  # in output order, with the real widths
    assert layer.lora_B["q"].shape == (64, 2) and layer.lora_B["v"].shape == (16, 2)
    randomize_lora_(model, seed=3, std=0.5)
    x = torch.randn(5, 32)
    with torch.no_grad():
        delta = model(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert delta[:, :64].abs().min() > 0 and delta[:, 80:].abs().min() > 0
    assert torch.equal(delta[:, 64:80], torch.zeros(5, 16))  # the k rows are untouched
