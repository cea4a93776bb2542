"""Find the projections a LoRA config names and wrap them in :class:`LoRALinear`.

A target is one of:

* an alias of the model family, e.g. for GPT-2 ``q``, ``k``, ``v`` (slices of the fused
  ``attn.c_attn``), ``qkv`` (the whole of it), ``attn.out``, ``mlp.fc``, ``mlp.proj``;
* a module-name suffix, e.g. ``c_attn`` or ``mlp.c_fc`` (PEFT's list semantics);
* ``all-linear``: every linear projection except the output head;
* ``re:<regex>``, matched with ``re.fullmatch`` against full module names.

Works on any ``nn.Module`` tree, our models and transformers' alike (transformers' GPT-2
``Conv1D`` is handled as a transposed linear).
"""

from __future__ import annotations

import re
from torch import nn

from ..errors import ConfigError, TargetError
from ..models.registry import family_of
from ..models.spec import Alias, Span
from .init import initialise
from .lora import WHOLE, LoRAConfig, LoRALinear, lora_layers
from .update import rank_limit


HEAD_NAMES = ("lm_head", "embed_out", "output")
"""Output heads: never adapted by all-linear, never quantized."""


def model_aliases(model: nn.Module) -> dict[str, Alias]:
    """The family's alias table (ours and transformers' models of a known family), else {}."""
    found = family_of(model)
    return found[0].aliases if found else {}


def fused_spans(model: nn.Module, name: str) -> dict[str, Span]:
    """The named output slices of fused projection ``name`` ({} where it is not fused), from the family spec."""
    found = family_of(model)
    return found[0].slice_spans(found[1], name) if found else {}


def linear_kind(module: nn.Module) -> bool | None:
    """None if ``module`` is no linear projection, else whether its weight is stored transposed
    (a LoRA layer counts, so a second adapter can target it; a quantized base is stored (out, in))."""
    if isinstance(module, LoRALinear):
        return module.fan_in_fan_out
    if getattr(module, "is_quantized", False) or isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return True  # transformers.pytorch_utils.Conv1D: weight is (in, out)
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear projection, whatever holds its weight."""
    if isinstance(module, LoRALinear) or getattr(module, "is_quantized", False):
        return int(module.in_features), int(module.out_features)
    out_f, in_f = module.weight.shape[::-1] if linear_kind(module) else module.weight.shape
    return int(in_f), int(out_f)


def targetable(model: nn.Module) -> dict[str, nn.Module]:
    """The linear projections a target may name: plain, quantized or LoRA layers, but not the quantized
    base a LoRA layer holds (its ``.quant``: adapting it would nest one LoRA layer in another)."""
    modules = dict(model.named_modules())
    inside = {f"{n}.quant" for n, m in modules.items() if isinstance(m, LoRALinear)}
    return {n: m for n, m in modules.items() if linear_kind(m) is not None and n not in inside}


def suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(model: nn.Module, targets: list[str]) -> dict[str, list[str] | None]:
    """Map each linear module named by ``targets`` to the fused slices it gets (None = the whole module).

    Returns ``{module_name: None | [slice names]}``. Raises :class:`TargetError` for a target
    that matches nothing, or for a module targeted both whole and by slices.
    """
    linears = targetable(model)
    aliases = model_aliases(model)
    plan: dict[str, list[str] | None] = {}
    for target in targets:
        alias = aliases.get(target)
        hits = _matches(target, linears, alias)
        if not hits:
            _no_match(target, linears, aliases)
        for n in hits:
            if alias is not None and alias.slice is not None:
                if n in plan and plan[n] is None:
                    raise TargetError(f"{n} is targeted both whole and as slice {target!r}; pick one")
                plan[n] = [*(plan.get(n) or []), alias.slice]
            elif plan.get(n):
                raise TargetError(f"{n} is targeted both whole and by slices ({', '.join(plan[n])}); pick one")
            else:
                plan[n] = None
    return plan


def _matches(target: str, linears: dict[str, nn.Module], alias: Alias | None) -> list[str]:
    if alias is not None:
        return [n for n in linears if suffix_match(n, alias.module)]
    if target == "all-linear":
        return [n for n in linears if n.split(".")[-1] not in HEAD_NAMES]
    if target.startswith("re:"):
        try:
            pattern = re.compile(target[3:])
        except re.error as exc:
            raise TargetError(f"bad regex in LoRA target {target!r}: {exc}") from None
        return [n for n in linears if pattern.fullmatch(n)]
    return [n for n in linears if suffix_match(n, target)]


def _no_match(target: str, linears: dict, aliases: dict) -> None:
    kinds = sorted({n.split(".")[-1] for n in linears} | {".".join(n.split(".")[-2:]) for n in linears})
    hint = f"aliases: {', '.join(aliases)}; " if aliases else ""
    raise TargetError(
        f"LoRA target {target!r} matches no linear layer of this model. Try {hint}module names such as "
        f"{', '.join(kinds[:12])}; or 'all-linear', or 're:<regex>'"
    )


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(model: nn.Module, cfg: LoRAConfig, adapter: str = "default", activate: bool = True) -> list[str]:
    """Add adapter ``adapter`` to every targeted projection in place; returns their names.

    A plain projection is replaced by a :class:`LoRALinear`; one that already is gets the adapter
    added beside its others. The base weights are shared, not copied, and keep their state-dict
    keys. Slices of a fused projection take the spans the family spec gives (their real widths:
    under grouped-query attention q, k and v differ), in the projection's output order. A rank
    above a layer's min(in, out) is refused before any module is replaced (see :func:`check_rank`).
    ``activate`` makes the new adapter the model's only active one; else the active set stays.
    """
    before = next((m.active for _, m in lora_layers(model)), [])
    if any(adapter in m.lora for _, m in lora_layers(model)):
        raise ConfigError(f"the model already has an adapter named {adapter!r}: pick another name")
    plan = resolve_targets(model, cfg.targets)
    layers = {}
    for name, slice_names in plan.items():
        slices = None
        if slice_names:
            spans = fused_spans(model, name)
            slices = {n: spans[n] for n in sorted(set(slice_names), key=lambda n: spans[n][0])}
        layers[name] = slices
    check_rank(model, layers, cfg.r)
    for name, slices in layers.items():
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            base.add_adapter(adapter, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, slices, cfg.variant)
        else:
            replace_module(model, name, LoRALinear.wrap(base, cfg, slices, bool(linear_kind(base)), adapter))
    initialise([layer for _, layer in lora_layers(model)], cfg.init, adapter)
    for _, m in lora_layers(model):
        m.set_active([adapter] if activate else before)
    return list(plan)


def check_rank(model: nn.Module, layers: dict[str, dict[str, Span] | None], r: int) -> None:
    """ConfigError if rank ``r`` exceeds min(in, out) of a targeted layer (or slice): it would not be low-rank.

    Why: such an update costs more than the full weight it replaces, trains no better than
    r = min(in, out), and is usually a typo or a rank copied from a wider model. The message
    names the narrowest layer, so the rank it suggests fits every targeted layer.
    """
    widths = []  # (limit, module, narrowest slice, in, its out) for every adapted layer
    for name, slices in layers.items():
        in_f, out_f = features(model.get_submodule(name))
        spans = slices or {WHOLE: (0, out_f)}
        limit, part = rank_limit(in_f, spans)
        widths.append((limit, name, part, in_f, spans[part][1] - spans[part][0]))
    if not widths or r <= min(w[0] for w in widths):
        return
    limit, name, part, in_f, out_f = min(widths, key=lambda w: w[0])
    where = name if part == WHOLE else f"{name}'s {part} slice"
    raise ConfigError(f"lora.r={r} exceeds {where} (in {in_f}, out {out_f}): a rank above min(in, out) is no "
                      f"longer low-rank; use r <= {limit}")
