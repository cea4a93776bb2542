"""loratune/adapters/init.py against PEFT's init_lora_weights on a tiny Llama (float32, 1e-5 relative).

PEFT's layers run their own init code (``get_peft_model``, or the layer's ``reset_lora_parameters`` /
``pissa_init`` re-run under a fixed seed for the random inits); ours run on the original weights.
The targets cover square (q), wide (v: 32 x 64, down: 64 x 96) and tall (up: 96 x 64) weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from family_models import hf_family_model
from loratune.adapters.init import LoRAInit, initialise, olora_init, parse_init, pissa_init, to_plain_lora
from loratune.adapters.lora import LoRALinear, lora_scale
from loratune.errors import ConfigError

RTOL = 1e-5
R, ALPHA = 4, 8.0  # scale 2: PiSSA divides the singular values by it, OLoRA does not
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.fixture(scope="module")
def base():
    """The tiny Llama (3 layers, width 64, weights N(0, 0.25)) and a copy of its original weights."""
    model = hf_family_model("llama", seed=0)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def _started(init: str, weight: torch.Tensor, rslora: bool = False, seed: int | None = None):
    """(A, B, the layer's new weight) of a LoRALinear over ``weight`` (rank R, alpha ALPHA) given init ``init`` by
    :func:`initialise`, the path inject_lora takes; ``seed`` seeds torch's RNG before the layer is built (the
    default init's draws) and again before the init (gaussian's, randomized SVD's)."""
    if seed is not None:
        torch.manual_seed(seed)
    layer = LoRALinear(nn.Parameter(weight.clone(), requires_grad=False), None, R, ALPHA, rslora=rslora)
    if seed is not None:
        torch.manual_seed(seed)
    initialise([layer], init, "default")
    return layer.lora_A["all"].detach(), layer.lora_B["all"].detach(), layer.weight.detach()


def _peft(model, init, rslora: bool = False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=init, use_rslora=rslora,
                     lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(model), cfg).eval()


def _lora_layers(peft_model):
    """(name of the original Linear in the plain model, PEFT LoRA layer), for every adapted layer."""
    layers = [(n.removeprefix("base_model.model."), m) for n, m in peft_model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 3 * len(TARGETS)
    return layers


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_deterministic_inits_equal_peft(base, init):
    model, original = base
    peft_model = _peft(model, init)
    for name, layer in _lora_layers(peft_model):
        a, b, residual = _started(init, original[name + ".weight"])
        _close(a, layer.lora_A["default"].weight.detach())
        _close(b, layer.lora_B["default"].weight.detach())
        _close(residual, layer.base_layer.weight.detach())
        assert a.shape == (R, layer.in_features) and b.shape == (layer.out_features, R)


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa_niter_4"])
def test_random_inits_equal_peft_under_the_same_seed(base, init):
    """PEFT's own layer code re-run from the original weight under seed s; ours under seed s: the
    same draws in the same order (gaussian/default through a generator seeded like torch's global RNG,
    randomized SVD through the global RNG itself), so the results agree to rounding."""
    model, original = base
    peft_model = _peft(model, True)
    for i, (name, layer) in enumerate(_lora_layers(peft_model)):
        weight = original[name + ".weight"]
        with torch.no_grad():
            layer.base_layer.weight.copy_(weight)
        torch.manual_seed(100 + i)
        if init == "pissa_niter_4":
            layer.pissa_init("default", init)
        elif init == "gaussian":
            layer.reset_lora_parameters("default", init)
        else:
            layer.reset_lora_parameters("default", True)
        a, b, residual = _started(init, weight, seed=100 + i)
        _close(a, layer.lora_A["default"].weight.detach())
        _close(b, layer.lora_B["default"].weight.detach())
        _close(residual if residual is not None else weight, layer.base_layer.weight.detach())
    if init == "gaussian":  # PEFT's std is 1/r (not 1/sqrt(r)): the last layer's A, 64 * 4 or 96 * 4 draws
        assert 0.8 / R < a.std().item() < 1.2 / R


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_residual_plus_update_is_the_weight_so_outputs_start_unchanged(base, init):
    _, original = base
    w = original["model.layers.1.mlp.up_proj.weight"]  # (96, 64)
    scale = lora_scale(R, ALPHA)
    a, b, residual = _started(init, w, seed=0)
    _close(residual + scale * b @ a, w)
    layer = LoRALinear(nn.Parameter(residual.clone()), None, R, ALPHA)
    with torch.no_grad():
        layer.lora_A["all"].copy_(a), layer.lora_B["all"].copy_(b)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    _close(layer(x), F.linear(x, w))
    assert (residual - w).abs().max() > 0.1 * w.abs().max()  # the base really changed


def test_low_precision_weights_get_a_residual_in_their_dtype_and_float32_adapters(base):
    _, original = base
    w = original["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    for init in ("pissa", "olora"):
        a, b, residual = _started(init, w)  # scale ALPHA / R = 2
        assert residual.dtype == torch.bfloat16 and a.dtype == b.dtype == torch.float32
        _close(residual.float() + 2.0 * b @ a, w.float(), rtol=1e-2)  # bf16 rounding of the residual


def _perturb_(peft_model, seed: int) -> None:
    """What training does: move every A and B."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in _lora_layers(peft_model):
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("pissa", True), ("olora", False)])
def test_conversion_to_plain_lora_equals_peft_and_keeps_the_trained_weights(base, tmp_path, init, rslora):
    from safetensors.torch import load_file

    model, original = base
    peft_model = _peft(model, init, rslora)
    scale = lora_scale(R, ALPHA, rslora)
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter
    peft_model.save_pretrained(tmp_path / "init")
    peft_model.peft_config["default"].init_lora_weights = init
    _perturb_(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    for name, layer in _lora_layers(peft_model):
        w = original[name + ".weight"]
        a0, b0, residual = _started(init, w, rslora)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        a2, b2, r2, alpha2 = to_plain_lora(a, b, a0, b0, R, ALPHA, rslora)
        _close(a2, saved[f"base_model.model.{name}.lora_A.weight"])
        _close(b2, saved[f"base_model.model.{name}.lora_B.weight"])
        assert lora_scale(r2, alpha2, rslora) == pytest.approx(scale, rel=1e-12)
        trained = residual + scale * b @ a  # the fine-tuned weight, on PiSSA's residual base
        _close(w + lora_scale(r2, alpha2, rslora) * b2 @ a2, trained)
        assert (trained - w).abs().max() > 1e-2  # the perturbation moved the weight
    assert (config["r"], config["lora_alpha"]) == (r2, alpha2)


def test_parse_init_names():
    assert parse_init("pissa_niter_16") == LoRAInit("pissa", 16)
    assert parse_init("pissa") == LoRAInit("pissa") and parse_init("pissa").changes_base
    assert not parse_init("gaussian").changes_base and parse_init("olora").kind == "olora"


@pytest.mark.parametrize("name", ["pisa", "PiSSA", "pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "", True])
def test_unknown_init_names_list_the_valid_ones(name):
    with pytest.raises(ConfigError, match=r"unknown LoRA init .*default, gaussian, pissa, pissa_niter_<K>, olora"):
        parse_init(name)


@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_bad_weights_and_ranks_are_refused(init):
    w = torch.randn(32, 48)
    with pytest.raises(ConfigError, match=r"rank must be in 1..min\(out, in\) = 32 .* got 33"):
        init(w, 33, 1.0)
    with pytest.raises(ConfigError, match="float32, float16 or bfloat16 weight, got torch.int8"):
        init(w.to(torch.int8), 4, 1.0)
    with pytest.raises(ConfigError, match="2-D"):
        init(torch.randn(4, 8, 8), 2, 1.0)


def test_conversion_refuses_mismatched_shapes():
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    with pytest.raises(ConfigError, match="initial A and B"):
        to_plain_lora(a, b, a[:2], b[:, :2], 4, 8.0)
