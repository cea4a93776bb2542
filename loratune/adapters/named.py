"""Several adapters on one base, by name: list, switch, delete and combine them (PEFT's
``set_adapter``, ``delete_adapter`` and ``add_weighted_adapter``).

Adapters are added by :func:`~.targets.inject_lora` (a new one) or
:func:`~.peft_format.load_adapter` (a saved one), each under its own name; the model-wide
*active* list says which ones forward applies (none while :func:`~.lora.adapters_disabled`).
Only active adapters train (:func:`~.trainable.set_trainable`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, MergeError
from .combine import CombineConfig, LayerUpdate, check_same_targets, combine_layer, combined_rank_alpha, pad_rank
from .lora import LoRALinear, lora_layers
from .update import LoRAUpdate


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter on the model, in the order they were added."""
    return list(dict.fromkeys(n for _, m in lora_layers(model) for n in m.lora))


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters forward applies."""
    return next((list(m.active) for _, m in lora_layers(model)), [])


def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Apply exactly these adapters (one name, or several summed in order) from now on."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"no adapter named {unknown[0]!r}; the model has {', '.join(known) or 'none'}")
    for _, layer in lora_layers(model):
        layer.set_active(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (it must not be merged); layers left without any
    adapter keep their base weights and stay LoRA layers with nothing active."""
    if name not in adapter_names(model):
        raise ConfigError(f"no adapter named {name!r}; the model has {', '.join(adapter_names(model)) or 'none'}")
    for _, layer in lora_layers(model):
        if name in layer.lora:
            layer.delete_adapter(name)


def combine_adapters(model: nn.Module, names: list[str], weights: list[float], new_name: str,
                     how: str = "svd", seed: int | None = None, activate: bool = True, **options) -> CombineConfig:
    """Add adapter ``new_name`` combining ``names`` with ``weights``, as PEFT's ``add_weighted_adapter``.

    ``how`` is one of :data:`~.combine.COMBINATIONS` (linear, cat, svd, ties, dare_linear, ...),
    ``options`` the :class:`~.combine.CombineConfig` fields (svd_rank, density, ...). The new
    adapter adapts every module any of them adapts (TIES/DARE/magnitude pruning refuse adapters
    of different targets), with scale 1. ``seed`` makes DARE's random drops reproducible (None:
    torch's global RNG, which is what PEFT draws from). Returns the settings used.
    """
    cfg = CombineConfig(how=how, **options)
    known = adapter_names(model)
    if new_name in known:
        raise ConfigError(f"the model already has an adapter named {new_name!r}: pick another name")
    if len(names) != len(weights) or not names:
        raise ConfigError(f"{len(names)} adapters but {len(weights)} weights: give one weight per adapter")
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"no adapter named {missing[0]!r}; the model has {', '.join(known) or 'none'}")
    layers = list(lora_layers(model))
    _refuse_uncombinable(layers, names)
    check_same_targets({n: {m for m, layer in layers if n in layer.lora} for n in names}, cfg.how)
    ranks = [max(layer.lora[n].stacked_A().shape[0] for _, layer in layers if n in layer.lora) for n in names]
    r, alpha = combined_rank_alpha(cfg.how, ranks, cfg.svd_rank)
    device = next(p.device for _, layer in layers for n in names if n in layer.lora for p in layer.lora[n].parameters())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    built = {}
    for module, layer in layers:  # module order, one generator: PEFT's order of random draws
        updates = [_layer_update(layer, n) for n in names]
        if all(u is None for u in updates):
            continue
        a, b = combine_layer(updates, list(weights), cfg.how, svd_rank=r if "svd" in cfg.how else None,
                             svd_clamp=cfg.svd_clamp, full_matrices=cfg.full_matrices, driver=cfg.driver,
                             density=cfg.density, majority_sign_method=cfg.majority_sign_method,
                             generator=generator)
        built[module] = pad_rank(a, b, r)
    with torch.random.fork_rng(devices=[]):  # the new updates' own init must not consume the caller's RNG
        for module, layer in layers:
            if module in built:
                layer.lora[new_name] = _new_update(layer, *built[module], r, alpha)
    if activate:
        set_active_adapters(model, new_name)
    return cfg


def _refuse_uncombinable(layers: list[tuple[str, LoRALinear]], names: list[str]) -> None:
    """A variant whose state does not add up like LoRA updates (DoRA's magnitudes) cannot be combined."""
    refused = {n: layer.lora[n] for _, layer in layers for n in names
               if n in layer.lora and layer.lora[n].combine_refusal}
    if refused:
        name = min(refused)
        u = refused[name]
        raise MergeError(f"adapter {name!r} is a {u.title} adapter: {u.combine_refusal}")


def _layer_update(layer: LoRALinear, name: str) -> LayerUpdate | None:
    if name not in layer.lora:
        return None
    u = layer.lora[name]
    return LayerUpdate(A=u.stacked_A().detach(), B=u.stacked_B(scaled=False).detach(), scale=u.scale)


def _new_update(layer: LoRALinear, a: torch.Tensor, b: torch.Tensor, r: int, alpha: float) -> LoRAUpdate:
    u = LoRAUpdate(layer.in_features, layer.out_features, r, alpha, device=a.device)
    with torch.no_grad():
        u.lora_A["all"].copy_(a)
        u.lora_B["all"].copy_(b)
    return u
