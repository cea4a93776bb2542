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
from dataclasses import dataclass

from torch import nn

from .errors import TargetError
from .lora import LoRAConfig, LoRALinear


@dataclass(frozen=True)
class Alias:
    """A friendly target name: a module-name suffix and, for fused projections, which slice."""

    module: str
    slice_index: int | None = None
    num_slices: int = 1
    slice_name: str | None = None


GPT2_ALIASES: dict[str, Alias] = {
    "q": Alias("attn.c_attn", 0, 3, "q"),
    "k": Alias("attn.c_attn", 1, 3, "k"),
    "v": Alias("attn.c_attn", 2, 3, "v"),
    "qkv": Alias("attn.c_attn"),
    "attn.qkv": Alias("attn.c_attn"),
    "attn.out": Alias("attn.c_proj"),
    "mlp.fc": Alias("mlp.c_fc"),
    "mlp.proj": Alias("mlp.c_proj"),
}

_FAMILY_ALIASES = {"gpt2": GPT2_ALIASES}
_HEAD_NAMES = ("lm_head", "embed_out", "output")


def model_aliases(model: nn.Module) -> dict[str, Alias]:
    """The alias table for a model: ours carry ``model_type``; transformers' have ``config.model_type``."""
    model_type = getattr(model, "model_type", None) or getattr(getattr(model, "config", None), "model_type", None)
    return _FAMILY_ALIASES.get(model_type, {})


def linear_kind(module: nn.Module) -> bool | None:
    """None if ``module`` is no linear projection, else whether its weight is stored transposed."""
    if isinstance(module, LoRALinear):
        return None
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return True  # transformers.pytorch_utils.Conv1D: weight is (in, out)
    return None


def suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(model: nn.Module, targets: list[str]) -> dict[str, dict[str, int] | None]:
    """Map each linear module named by ``targets`` to the slice indices it gets (None = whole).

    Returns ``{module_name: None | {slice_name: (slice_index, num_slices)}}``. Raises
    :class:`TargetError` for a target that matches nothing, or for a module targeted both
    whole and by slices.
    """
    linears = {n: m for n, m in model.named_modules() if linear_kind(m) is not None}
    aliases = model_aliases(model)
    plan: dict[str, dict | None] = {}
    whole: set[str] = set()
    for target in targets:
        if target == "all-linear":
            hits = [n for n in linears if n.split(".")[-1] not in _HEAD_NAMES]
        elif target.startswith("re:"):
            try:
                pattern = re.compile(target[3:])
            except re.error as exc:
                raise TargetError(f"bad regex in LoRA target {target!r}: {exc}") from None
            hits = [n for n in linears if pattern.fullmatch(n)]
        elif target in aliases:
            alias = aliases[target]
            hits = [n for n in linears if suffix_match(n, alias.module)]
            if alias.slice_index is not None:
                for n in hits:
                    if n in whole:
                        raise TargetError(f"{n} is targeted both whole and as slice {target!r}; pick one")
                    slices = plan.get(n) or {}
                    slices[alias.slice_name] = (alias.slice_index, alias.num_slices)
                    plan[n] = slices
                if not hits:
                    _no_match(target, linears, aliases)
                continue
        else:
            hits = [n for n in linears if suffix_match(n, target)]
        if not hits:
            _no_match(target, linears, aliases)
        for n in hits:
            if plan.get(n):
                raise TargetError(f"{n} is targeted both whole and by slices ({', '.join(plan[n])}); pick one")
            plan[n] = None
            whole.add(n)
    return plan


def _no_match(target: str, linears: dict, aliases: dict) -> None:
    kinds = sorted({n.split(".")[-1] for n in linears} | {".".join(n.split(".")[-2:]) for n in linears})
    hint = f"aliases: {', '.join(aliases)}; " if aliases else ""
    raise TargetError(
        f"LoRA target {target!r} matches no linear layer of this model. Try {hint}module names such as "
        f"{', '.join(kinds[:12])}; or 'all-linear', or 're:<regex>'"
    )


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every targeted projection with a :class:`LoRALinear` in place; returns their names.

    The base weights are shared, not copied, and keep their state-dict keys.
    """
    plan = resolve_targets(model, cfg.targets)
    for name, slice_spec in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        transposed = bool(linear_kind(base))
        out_features = base.weight.shape[1] if transposed else base.weight.shape[0]
        slices = None
        if slice_spec:
            order = sorted(slice_spec.items(), key=lambda kv: kv[1][0])
            slices = {}
            for slice_name, (index, count) in order:
                if out_features % count:
                    raise TargetError(f"{name} has {out_features} outputs, not divisible into {count} slices")
                width = out_features // count
                slices[slice_name] = (index * width, (index + 1) * width)
        setattr(parent, child, LoRALinear.wrap(base, cfg, slices=slices, fan_in_fan_out=transposed))
    return list(plan)
