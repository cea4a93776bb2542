"""Combining LoRA adapters (loratune/adapters/combine.py) against PEFT's ``add_weighted_adapter``.

A tiny Llama (2 layers, width 64) carries PEFT adapters with seeded random A and B on q, v and
down projections: r4a, r4b, r4c of rank 4 (different alphas), r6 of rank 6, qonly of rank 4 on q
only. For
every combination type PEFT combines them; ``combine_layer`` on the same per-layer tensors must
give PEFT's new A and B (for the *svd types, whose factors are unique only up to signs, the
update B @ A), and the logits of the base weights plus our updates must equal PEFT's with its
combined adapter active; all in float32 to 1e-5 relative. DARE's draws use the same seed on both
sides (reseeded right after PEFT injects the new adapter, whose init also draws).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from family_models import hf_family_model

from loratune.adapters.combine import (COMBINATIONS, CombineConfig, LayerUpdate, check_same_targets,
                                       combine_layer, combined_rank_alpha, drop_random, pad_rank)
from loratune.adapters.lora import lora_scale
from loratune.errors import ConfigError, MergeError

RTOL = 1e-5
SEED = 1234
TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {"r4a": (4, 8.0, TARGETS), "r4b": (4, 16.0, TARGETS), "r4c": (4, 2.0, TARGETS),
            "r6": (6, 6.0, TARGETS), "qonly": (4, 4.0, ["q_proj"])}
"""name -> (r, lora_alpha, target_modules)."""
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted:UserWarning")]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol = RTOL * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol)


@pytest.fixture(scope="module")
def models():
    """(the base transformers model, untouched; the same weights wrapped by PEFT with ADAPTERS)."""
    from peft import LoraConfig, get_peft_model

    base = hf_family_model("llama", seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           vocab_size=128)
    peft = None
    for name, (r, alpha, targets) in ADAPTERS.items():
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
        if peft is None:
            peft = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            peft.add_adapter(name, cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return base, peft.eval()


def _lora_modules(peft) -> list[tuple[str, torch.nn.Module]]:
    """The LoRA layers in module order (PEFT's order of visiting them), named as in the base model."""
    prefix = "base_model.model."
    return [(n.removeprefix(prefix), m) for n, m in peft.named_modules() if hasattr(m, "lora_A") and "lora_" not in
            n.rsplit(".", 1)[-1]]


def _updates(module, names: list[str]) -> list[LayerUpdate | None]:
    return [LayerUpdate(module.lora_A[n].weight.detach().clone(), module.lora_B[n].weight.detach().clone(),
                        module.scaling[n]) if n in module.lora_A else None for n in names]


def _peft_combine(peft, names, weights, new, **kwargs) -> None:
    """PEFT's add_weighted_adapter, with the global RNG reseeded after the new adapter's own init."""
    lora_model = peft.base_model
    inject = lora_model.inject_adapter

    def inject_then_seed(*args, **kw):
        out = inject(*args, **kw)
        torch.manual_seed(SEED)
        return out
    lora_model.inject_adapter = inject_then_seed
    try:
        peft.add_weighted_adapter(names, weights, new, **kwargs)
    finally:
        del lora_model.inject_adapter


def _ours(peft, names, weights, how, generator=None, **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    rank, _ = combined_rank_alpha(how, [ADAPTERS[n][0] for n in names], kwargs.get("svd_rank"))
    out = {}
    for layer, module in _lora_modules(peft):
        ups = _updates(module, names)
        if all(u is None for u in ups):
            continue
        A, B = combine_layer(ups, weights, how, generator=generator, **kwargs)
        out[layer] = pad_rank(A, B, rank) if how == "cat" else (A, B)
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _base_plus(base, combined) -> torch.nn.Module:
    """A copy of the base model with B @ A (scale 1) added to each combined layer's weight."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, (A, B) in combined.items():
            modules[layer].weight += B @ A  # (out, r) @ (r, in)
    return model


def _compare(peft, base, names, weights, how, **kwargs) -> None:
    new = f"{how}_{'_'.join(names)}"
    renamed = {"full_matrices": "svd_full_matrices", "driver": "svd_driver"}
    _peft_combine(peft, names, weights, new, combination_type=how, **{renamed.get(k, k): v for k, v in kwargs.items()})
    try:
        ours = _ours(peft, names, weights, how, generator=torch.Generator().manual_seed(SEED), **kwargs)
        r, alpha = combined_rank_alpha(how, [ADAPTERS[n][0] for n in names], kwargs.get("svd_rank"))
        assert (peft.peft_config[new].r, peft.peft_config[new].lora_alpha) == (r, alpha)
        compared = 0
        for layer, module in _lora_modules(peft):
            if new not in module.lora_A:
                continue
            A_ref, B_ref = module.lora_A[new].weight.detach(), module.lora_B[new].weight.detach()
            assert module.scaling[new] == 1.0
            A, B = ours[layer]
            if how.endswith("svd"):  # factors unique up to signs: compare the update
                _close(B @ A, B_ref @ A_ref)
            else:
                _close(A, A_ref)
                _close(B, B_ref)
            compared += 1
        assert compared == len(ours) > 0
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
        peft.set_adapter(new)
        expected = _logits(peft, ids)
        with peft.disable_adapter():
            assert (expected - _logits(peft, ids)).abs().max() > 1e-2 * expected.abs().max()  # the adapter matters
        _close(_logits(_base_plus(base, ours), ids), expected)
    finally:
        peft.delete_adapter(new)


CASES = [
    ("svd", ["r4a", "r4b", "r6"], [0.8, -0.5, 1.3], dict(svd_rank=5)),
    ("svd", ["r4a", "r6"], [-0.7, 1.1], dict(full_matrices=False)),
    ("cat", ["r4a", "r4b", "r6"], [0.8, -0.5, 1.3], {}),
    ("linear", ["r4a", "r4b", "r4c"], [0.8, -0.5, 1.3], {}),
    ("ties", ["r4a", "r4b", "r4c"], [0.8, -0.5, 1.3], dict(density=0.5)),
    ("ties", ["r4a", "r4b", "r4c"], [1.0, 0.6, 0.9], dict(density=0.7, majority_sign_method="frequency")),
    ("ties_svd", ["r4a", "r4b", "r6"], [0.8, -0.5, 1.3], dict(density=0.5)),
    ("dare_linear", ["r4a", "r4b", "r4c"], [0.8, -0.5, 1.3], dict(density=0.6)),
    ("dare_ties", ["r4a", "r4b", "r4c"], [0.8, 0.5, 1.3], dict(density=0.6, majority_sign_method="frequency")),
    ("dare_linear_svd", ["r4a", "r4b", "r6"], [0.8, -0.5, 1.3], dict(density=0.7, svd_rank=6)),
    ("dare_ties_svd", ["r4a", "r4b", "r6"], [0.8, 0.5, 1.3], dict(density=0.7)),
    ("magnitude_prune", ["r4a", "r4b", "r4c"], [0.8, -0.5, 1.3], dict(density=0.4)),
    ("magnitude_prune_svd", ["r4a", "r4b", "r6"], [0.8, -0.5, 1.3], dict(density=0.4, svd_clamp=0.9)),
]


@pytest.mark.parametrize("how, names, weights, kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_combination_equals_peft(how, names, weights, kwargs, models):
    _compare(models[1], models[0], names, weights, how, **kwargs)


def test_every_combination_type_is_covered():
    assert {c[0] for c in CASES} == set(COMBINATIONS)


@pytest.mark.parametrize("how", ["svd", "cat", "linear"])
def test_adapters_of_different_targets_combine_like_peft(how, models):
    """qonly adapts only q: elsewhere PEFT combines the others alone, as if qonly's update were zero there."""
    _compare(models[1], models[0], ["r4a", "qonly"], [0.9, -1.2], how)


def test_one_adapter_is_combined_linearly_like_peft(models):
    _compare(models[1], models[0], ["r6"], [-0.6], "svd", svd_rank=2)
    assert combined_rank_alpha("svd", [6], svd_rank=2) == (6, 6.0)


def test_dare_global_rng_equals_generator(models):
    names, weights = ["r4a", "r4b", "r4c"], [0.8, -0.5, 1.3]
    torch.manual_seed(SEED)
    from_global = _ours(models[1], names, weights, "dare_ties", density=0.5)
    from_gen = _ours(models[1], names, weights, "dare_ties", torch.Generator().manual_seed(SEED), density=0.5)
    other = _ours(models[1], names, weights, "dare_ties", torch.Generator().manual_seed(SEED + 1), density=0.5)
    for layer, (A, B) in from_global.items():
        torch.testing.assert_close(from_gen[layer], (A, B), rtol=0, atol=0)
    assert any(not torch.equal(other[k][0], from_global[k][0]) for k in other)


def test_dare_keeps_density_and_expectation():
    t = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    dropped = drop_random(t, 0.3, torch.Generator().manual_seed(1))
    kept = (dropped != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    _close(dropped[dropped != 0], t[dropped != 0] / 0.3)
    assert drop_random(t, 1.0) is t


def test_rslora_combined_scale_is_one(models):
    """PEFT keeps the first adapter's use_rslora, so its combined adapter (alpha = r) is scaled by
    sqrt(r), not the 1 its A and B assume; we give alpha = sqrt(r) there: scale 1."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(models[0]), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                               use_rslora=True), adapter_name="r4")
    peft.add_adapter("r6", LoraConfig(r=6, lora_alpha=8, target_modules=["q_proj"], use_rslora=True))
    peft.add_weighted_adapter(["r4", "r6"], [1.0, 1.0], "both", combination_type="cat")
    peft_scales = [m.scaling["both"] for m in peft.modules() if "both" in getattr(m, "lora_A", {})]
    assert len(peft_scales) == 2 and peft_scales == pytest.approx([math.sqrt(10)] * 2)
    r, alpha = combined_rank_alpha("cat", [4, 6], rslora=True)
    assert r == 10 and lora_scale(r, alpha, rslora=True) == pytest.approx(1.0)
    r, alpha = combined_rank_alpha("ties", [4, 4, 4])
    assert (r, alpha) == (4, 4.0) and lora_scale(r, alpha) == 1.0
    assert combined_rank_alpha("dare_ties_svd", [4, 6]) == (6, 6.0)
    assert combined_rank_alpha("svd", [4, 6], svd_rank=3) == (3, 3.0)


def _ups(ranks=(4, 4), out=8, inp=6) -> list[LayerUpdate]:
    gen = torch.Generator().manual_seed(0)
    return [LayerUpdate(torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen), 0.5) for r in ranks]


@pytest.mark.parametrize("how", ["ties", "dare_linear", "dare_ties_svd", "magnitude_prune"])
def test_sparsifying_types_refuse_different_targets(how):
    targets = {"a": {"l0.q", "l0.v", "l1.q"}, "d": {"l0.q", "l1.q"}}
    with pytest.raises(MergeError, match=r"d lacks l0\.v"):
        check_same_targets(targets, how)
    with pytest.raises(MergeError, match="adapt every combined layer"):
        combine_layer([_ups()[0], None], [1.0, 1.0], how, density=0.5)
    assert check_same_targets(targets, "svd") == {"l0.q", "l0.v", "l1.q"}
    assert check_same_targets({"a": {"x"}, "b": {"x"}}, how) == {"x"}


def test_linear_refuses_different_ranks():
    with pytest.raises(MergeError, match="same rank"):
        combine_layer(_ups((4, 6)), [1.0, 1.0], "linear")
    with pytest.raises(MergeError, match="same rank"):
        combined_rank_alpha("dare_ties", [4, 6])
    A, B = combine_layer(_ups((4, 6)), [1.0, -1.0], "cat")
    assert A.shape == (10, 6) and B.shape == (8, 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(how="nope"), "unknown combination type 'nope': use one of svd, linear, cat"),
    (dict(how="ties"), "needs density"),
    (dict(how="ties", density=0.0), r"density must be in \(0, 1\]"),
    (dict(how="dare_linear", density=1.5), r"density must be in \(0, 1\]"),
    (dict(how="dare_ties_svd", density=-0.1), r"density must be in \(0, 1\]"),
    (dict(how="linear", density=0.5), "density applies to"),
    (dict(how="svd", svd_rank=0), "svd_rank must be a positive integer"),
    (dict(how="svd", svd_rank=-2), "svd_rank must be a positive integer"),
    (dict(how="cat", svd_rank=2), "svd_rank applies to the"),
    (dict(how="svd", svd_clamp=1.5), "svd_clamp is a quantile"),
    (dict(how="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
])
def test_bad_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CombineConfig(**kwargs)
    with pytest.raises(ConfigError, match=match):
        combine_layer(_ups(), [1.0, 1.0], **kwargs)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="no adapters"):
        combine_layer([], [], "svd")
    with pytest.raises(ConfigError, match="2 adapters but 3 weights"):
        combine_layer(_ups(), [1.0, 1.0, 1.0], "cat")
    with pytest.raises(ConfigError, match="finite"):
        combine_layer(_ups(), [1.0, math.nan], "cat")
    with pytest.raises(MergeError, match="none of the adapters"):
        combine_layer([None, None], [1.0, 1.0], "svd")
    with pytest.raises(MergeError, match="exceeds this layer's full rank 6"):
        combine_layer(_ups(), [1.0, 1.0], "svd", svd_rank=7)
    odd = _ups() + [LayerUpdate(torch.ones(4, 5), torch.ones(8, 4), 1.0)]
    with pytest.raises(MergeError, match="differ in shape"):
        combine_layer(odd, [1.0, 1.0, 1.0], "svd")
