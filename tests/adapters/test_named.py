"""Several adapters on one base (loratune/adapters/named.py), against PEFT on the same weights.

Three PEFT adapters (two on q, v and down, one on q only; seeded random A and B) are saved and
loaded here by name. Switching the active adapter gives PeftModel's logits for that adapter,
disabling gives the base's, only the active adapter trains, and combining them (linear, cat, svd,
TIES, DARE) gives the logits of PEFT's ``add_weighted_adapter`` result: float32, 1e-5 relative.
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from family_models import token_ids, write_decoder
from test_combine import SEED, _peft_combine

from loratune.adapters.lora import adapters_disabled, lora_layers
from loratune.adapters.named import (active_adapters, adapter_names, combine_adapters, delete_adapter,
                                     set_active_adapters)
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.trainable import set_trainable
from loratune.errors import ConfigError, MergeError
from loratune.models import load_model

RTOL = 1e-5
ADAPTERS = {"a": (4, 8.0, ["q_proj", "v_proj", "down_proj"]), "b": (4, 16.0, ["q_proj", "v_proj", "down_proj"]),
            "qonly": (6, 6.0, ["q_proj"])}
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted:UserWarning")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base checkpoint, {name: adapter dir}) with PEFT-made adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("named")
    base = write_decoder("llama", root / "base")
    dirs = {}
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets))
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        peft.save_pretrained(root / name)
        dirs[name] = root / name
    return base, dirs


def _peft(base, dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(dirs)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dirs[names[0]],
                                     adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(dirs[name], adapter_name=name)
    return peft.eval()


def _ours(base, dirs):
    model, _ = load_model(base)
    for name, path in dirs.items():
        load_adapter(model, path, name=name)
    return model


def test_switching_adapters_gives_each_adapters_peft_logits(saved):
    base, dirs = saved
    ours, peft = _ours(base, dirs), _peft(base, dirs)
    assert adapter_names(ours) == list(dirs) and active_adapters(ours) == ["qonly"]  # the last loaded
    ids = token_ids(seed=3)
    seen = []
    with torch.no_grad():
        for name in dirs:
            set_active_adapters(ours, name)
            peft.set_adapter(name)
            expected = peft(input_ids=ids).logits
            assert rel_err(ours(ids), expected) <= RTOL, name
            seen.append(expected)
        with adapters_disabled(ours), peft.disable_adapter():
            plain = peft(input_ids=ids).logits
            assert rel_err(ours(ids), plain) <= RTOL
    assert min(rel_err(a, b) for a in seen + [plain] for b in seen + [plain] if a is not b) > 1e-2


def test_only_the_active_adapter_trains_and_saves(saved, tmp_path):
    base, dirs = saved
    ours = _ours(base, dirs)
    set_active_adapters(ours, "b")
    set_trainable(ours, "lora")
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.b." in n for n in trainable)
    from loratune.adapters.lora import LoRAConfig

    save_adapter(ours, tmp_path / "b", LoRAConfig(r=4, alpha=16.0, targets=["q_proj", "v_proj", "down_proj"]),
                 str(base))
    again, _ = load_model(base)
    load_adapter(again, tmp_path / "b")
    ids = token_ids(seed=4)
    with torch.no_grad():
        assert rel_err(again(ids), ours(ids)) <= RTOL
    delete_adapter(ours, "a")
    assert adapter_names(ours) == ["b", "qonly"]
    with pytest.raises(ConfigError, match="no adapter named 'a'"):
        set_active_adapters(ours, "a")


@pytest.mark.parametrize("how, names, weights, options", [
    ("linear", ["a", "b"], [0.7, 0.3], {}),
    ("cat", ["a", "b", "qonly"], [1.0, -0.5, 0.8], {}),
    ("svd", ["a", "b", "qonly"], [0.6, 0.6, 1.0], {"svd_rank": 5}),
    ("ties", ["a", "b"], [1.0, 1.0], {"density": 0.4}),
    ("dare_ties", ["a", "b"], [0.8, 0.5], {"density": 0.6}),
])
def test_combined_adapters_give_peft_logits(how, names, weights, options, saved):
    base, dirs = saved
    ours, peft = _ours(base, dirs), _peft(base, dirs)
    _peft_combine(peft, names, weights, "mix", combination_type=how, **options)  # DARE's drops from SEED
    peft.set_adapter("mix")
    torch.manual_seed(SEED)
    combine_adapters(ours, names, weights, "mix", how=how, **options)
    assert active_adapters(ours) == ["mix"]
    theirs = {n: m.r["mix"] for n, m in peft.base_model.model.named_modules() if hasattr(m, "r") and "mix" in m.r}
    assert {n: m.lora["mix"].r for n, m in lora_layers(ours) if "mix" in m.lora} == theirs
    ids = token_ids(seed=5)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        with peft.disable_adapter():
            assert rel_err(expected, peft(input_ids=ids).logits) > 1e-2
        assert rel_err(ours(ids), expected) <= RTOL


def test_combining_refuses_clearly(saved):
    base, dirs = saved
    ours = _ours(base, dirs)
    with pytest.raises(MergeError, match="qonly"):  # TIES over adapters of different targets
        combine_adapters(ours, ["a", "qonly"], [1.0, 1.0], "mix", how="ties", density=0.5)
    with pytest.raises(MergeError, match="same rank"):
        combine_adapters(ours, ["a", "qonly"], [1.0, 1.0], "mix", how="linear")
    with pytest.raises(ConfigError, match="one weight per adapter"):
        combine_adapters(ours, ["a", "b"], [1.0], "mix", how="linear")
    with pytest.raises(ConfigError, match="no adapter named 'zzz'"):
        combine_adapters(ours, ["a", "zzz"], [1.0, 1.0], "mix", how="cat")
    with pytest.raises(ConfigError, match="unknown combination type"):
        combine_adapters(ours, ["a", "b"], [1.0, 1.0], "mix", how="average")
    assert adapter_names(ours) == list(dirs)  # nothing added by a refused combination


def test_merging_an_adapter_that_targets_fewer_layers(saved):
    """Layers without the active adapter are left alone by merge_lora (as PEFT merges only where it is)."""
    from loratune.adapters.lora import merge_lora

    base, dirs = saved
    ours = _ours(base, dirs)  # 'qonly' (q_proj only) is active
    ids = token_ids(seed=6)
    with torch.no_grad():
        adapted = ours(ids)
        assert merge_lora(ours) == 3  # the q_proj of each layer
        assert rel_err(ours(ids), adapted) <= RTOL
