"""Adapters in the PEFT format, both ways: what vLLM, TGI, LoRAX, transformers and PEFT read.

A directory with ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules`` ...) and
``adapter_model.safetensors`` holding ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r) under the Hugging Face module names of the base model. Our own extras go to ``loratune_adapter.json``,
which PEFT ignores: the slices, our LoRAConfig, and the base's config (so an adapter loaded onto another model
family is refused by name, see :func:`~.peft_config.check_family`).

*Slices* of a fused projection (q and v of GPT-2's ``c_attn`` or Phi-3's ``qkv_proj``, up of ``gate_up_proj``)
have no PEFT twin, so they are written as the exactly equivalent whole-module adapter: A stacked ``[A_q; A_v]``
(rank S*r), B block-shaped with zero rows outside the slices (k's, at their real grouped-query width), and alpha
scaled so alpha'/r' (or alpha'/sqrt(r') with rsLoRA) is our scale. ``loratune_adapter.json`` records the slices,
so loading here restores them exactly.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..hub.files import read_json, read_pickled_tensors, read_safetensors
from ..hub.gguf_file import is_gguf_path
from ..runtime.finite import check_finite
from ..runtime.fsutil import atomic_dir
from ..hub.resolve import resolve_hub_dir
from ..models.registry import family_of
from .gguf_adapter import read_gguf_adapter
from .init import to_plain_lora
from .lora import WHOLE, LoRAConfig, LoRALinear, lora_layers
from .update import LoRAUpdate
from .variants import VARIANTS, flagged, peft_flags, variant_class
from .peft_config import (
    EXTRA_NAME,
    check_adapter_config,
    check_family,
    is_targeted,
    pattern_value,
)
from .targets import features, linear_kind, replace_module, targetable

log = logging.getLogger("loratune")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_EXTRA_KEYS = sorted({suffix for cls in VARIANTS.values() for suffix in cls.peft_extra})  # the variants' tensors
_EXTRA = "|".join(map(re.escape, _EXTRA_KEYS)) or "(?!)"  # (?!) matches nothing: no variant has extra tensors
_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<which>[AB])(?:\.default)?\.weight"
                  r"|(?P<extra>" + _EXTRA + r")(?:\.default)?(?:\.weight)?)$")
_EXTRA_TEXT = "".join(f" and {cls.title} {suffix.removeprefix('lora_').removesuffix('_vector')}s"
                      for cls in VARIANTS.values() for suffix in cls.peft_extra)  # " and DoRA magnitudes"


def _peft_tensors(u: LoRAUpdate) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One layer's (A, B, alpha) as PEFT's single whole-projection adapter with the same scale:
    the stacked A (S*r, in), the block B (out, S*r) and alpha scaled so alpha'/r' (or /sqrt(r'))
    equals ours (unchanged for one whole-projection slice). A PiSSA/OLoRA adapter (trained on the
    residual base) is converted to the plain adapter of the original base (rank doubled)."""
    with torch.no_grad():
        a, b = u.stacked_A().detach(), u.stacked_B(scaled=False).detach()
    r, alpha = a.shape[0], u.peft_alpha()
    if getattr(u, "lora_init_A", None) is not None:
        a, b, r, alpha = to_plain_lora(a, b, u.lora_init_A, u.lora_init_B, r, alpha, u.rslora)
    return a, b, alpha


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """Short suffixes (``c_attn``) where every layer of that kind is adapted, else full names."""
    kinds: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if linear_kind(module) is not None or isinstance(module, LoRALinear):
            kinds.setdefault(name.split(".")[-1], []).append(name)
    targets = []
    for kind, names in sorted(kinds.items()):
        chosen = [n for n in names if n in adapted]
        if chosen and len(chosen) == len(names):
            targets.append(kind)
        else:
            targets.extend(chosen)
    return targets


def adapter_updates(model: nn.Module, adapter: str | None = None) -> dict[str, LoRAUpdate]:
    """{module name: update} of adapter ``adapter`` (the one active adapter when None)."""
    layers = list(lora_layers(model))
    if not layers:
        raise CheckpointError("the model has no LoRA layers to save")
    if adapter is None:
        active = list(dict.fromkeys(n for _, m in layers for n in m.present()))
        if len(active) != 1:
            raise CheckpointError(f"{len(active)} adapters are active ({', '.join(active) or 'none'}): name the one "
                                  "to save")
        adapter = active[0]
    updates = {name: m.lora[adapter] for name, m in layers if adapter in m.lora}
    if not updates:
        raise CheckpointError(f"the model has no adapter named {adapter!r}")
    if any(adapter in m.merged_names for _, m in layers):
        raise CheckpointError("cannot save a merged adapter: unmerge first")
    return updates


def peft_adapter(model: nn.Module, lora: LoRAConfig, base_model: str,
                 adapter: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A pure conversion: (adapter_config.json dict, adapter_model tensors) for one adapter of the model."""
    updates = adapter_updates(model, adapter)
    tensors, ranks, alphas = {}, {}, {}
    for name, u in updates.items():
        a, b, alpha = _peft_tensors(u)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.float().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.float().contiguous().cpu()
        for suffix, tensor in u.peft_extra_tensors().items():  # a variant's own tensors (DoRA's magnitude)
            tensors[f"{PREFIX}{name}.{suffix}"] = tensor
        ranks[name], alphas[name] = a.shape[0], alpha
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[n] for n in ranks if ranks[n] == r).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": r, "lora_alpha": alpha, "lora_dropout": _dropout(updates),
        "target_modules": _target_modules(model, list(ranks)),
        "fan_in_fan_out": _hf_transposed(model) or any(m.fan_in_fan_out for _, m in lora_layers(model)),
        "use_rslora": _rslora(updates), "bias": "none", **peft_flags(list(updates.values())),
        "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha or ranks[n] != r},
    }
    return config, tensors


def _rslora(updates: dict[str, LoRAUpdate]) -> bool:
    """use_rslora of the adapter being saved (its own layers', not the recipe's: a combined adapter has none)."""
    kinds = {u.rslora for u in updates.values()}
    if len(kinds) > 1:
        raise CheckpointError("this adapter mixes rsLoRA and plain layers, which PEFT's format cannot express")
    return kinds.pop()


def _dropout(updates: dict[str, LoRAUpdate]) -> float:
    return max((float(u.dropout.p) if isinstance(u.dropout, nn.Dropout) else 0.0) for u in updates.values())


def save_adapter(model: nn.Module, out_dir: str | Path, lora: LoRAConfig, base_model: str,
                 adapter: str | None = None, base_quantization: dict[str, Any] | None = None) -> Path:
    """Write one adapter (the active one by default) as a PEFT-format directory (atomically:
    complete or absent); returns it. An adapter holding NaN/Inf is refused: it would turn every
    output NaN wherever it is applied. ``base_quantization`` records the base it was trained
    against (QLoRA), so a merge can use that base (see ``loratune merge``)."""
    config, tensors = peft_adapter(model, lora, base_model, adapter)
    check_finite(tensors, f"refusing to save the adapter to {out_dir}", "its training diverged: lower the lr")
    updates = adapter_updates(model, adapter)
    for note in sorted({(u.title, u.save_note) for u in updates.values() if u.save_note}):
        log.warning(f"saving a {note[0]} adapter to {out_dir}: {note[1]}")
    converted = any(getattr(u, "lora_init_A", None) is not None for u in updates.values())
    extra = {"format_version": 1, "lora": None if converted else asdict(lora), "base_model": str(base_model),
             "slices": {} if converted else {n: u.slices for n, u in updates.items() if list(u.slices) != [WHOLE]},
             "base_quantization": base_quantization,
             "residual_start": lora.init if converted else None,  # trained on W - s B0 A0: see merge/qlora.py
             **_fingerprints(model, updates),
             "base_config": _base_config(model)}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / EXTRA_NAME).write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
    return out


def _fingerprints(model: nn.Module, updates: dict[str, LoRAUpdate]) -> dict[str, Any]:
    """The base fingerprints the variants record (``dora_base_norms``: {module: numbers}, or None)."""
    keys = {cls.fingerprint_key: {} for cls in VARIANTS.values() if cls.fingerprint_key}
    for n, m in lora_layers(model):
        u = updates.get(n)
        if u is not None and u.fingerprint_key:
            keys[u.fingerprint_key][n] = u.base_fingerprint(_original_weight(m, u))
    return {key: found or None for key, found in keys.items()}


def _original_weight(layer: LoRALinear, u: LoRAUpdate) -> torch.Tensor:
    """The base weight the saved adapter applies to: the layer's, plus what a PiSSA/OLoRA start took out of it."""
    w = layer.base_weight()
    if getattr(u, "lora_init_A", None) is not None:
        w = w + u.scale * (u.lora_init_B.float() @ u.lora_init_A.float())
    return w


def _base_config(model: nn.Module) -> dict[str, Any] | None:
    return model.family.config_to_hf(model.config) if hasattr(getattr(model, "family", None), "config_to_hf") else None


def resolve_adapter_dir(name_or_path: str | Path) -> Path:
    """A local adapter directory, downloading a hub id if needed; a LoRA adapter GGUF file as it is."""
    if is_gguf_path(name_or_path) and Path(name_or_path).expanduser().is_file():
        return Path(name_or_path).expanduser()
    return resolve_hub_dir(name_or_path, [CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, EXTRA_NAME], "adapter")


def _hf_transposed(model: nn.Module) -> bool:
    """Whether transformers stores this family's projections transposed (PEFT's fan_in_fan_out)."""
    found = family_of(model)
    return bool(found and found[0].hf_linear_transposed)


@dataclass
class AdapterFiles:
    """An adapter read from disk and checked against a model, not yet attached (see :func:`read_adapter`)."""

    adapter_dir: Path
    config: dict[str, Any]
    extra: dict[str, Any]
    pairs: dict[str, dict[str, torch.Tensor]]


def read_adapter(model: nn.Module, adapter: str | Path, base_model: str | None = None) -> AdapterFiles:
    """Read a PEFT-format adapter (directory or hub id) and check that it fits ``model``, without changing the
    model: every tensor fits a module of this model (another architecture or hidden size is an error, not a
    silent mis-load), the config and the weights name the same modules, and the weights are finite."""
    adapter_dir = resolve_adapter_dir(adapter)
    if adapter_dir.is_file():  # a llama.cpp LoRA adapter GGUF (resolve_adapter_dir passes only those through)
        config, pairs = read_gguf_adapter(model, adapter_dir)
        check_finite({f"{n}.{k}": t for n, p in pairs.items() for k, t in p.items()}, f"adapter weights in "
                     f"{adapter_dir}", "the file is corrupt, or the run that wrote it diverged: train it again")
        return AdapterFiles(adapter_dir, config, {}, pairs)
    path = adapter_dir / CONFIG_NAME
    config = read_json(path, "adapter config")
    extra = read_json(adapter_dir / EXTRA_NAME, "loratune metadata") if (adapter_dir / EXTRA_NAME).is_file() else {}
    check_adapter_config(config, extra, path)
    check_family(model, config, extra, adapter_dir)
    saved_base = config.get("base_model_name_or_path")
    if base_model and saved_base and str(saved_base) != str(base_model):
        log.warning(f"adapter was trained on {saved_base!r}, applying it to {base_model!r}")
    if (adapter_dir / WEIGHTS_NAME).is_file():
        tensors = read_safetensors(adapter_dir / WEIGHTS_NAME)
    elif (adapter_dir / PICKLE_WEIGHTS_NAME).is_file():
        tensors = read_pickled_tensors(adapter_dir / PICKLE_WEIGHTS_NAME)
    else:
        raise CheckpointError(f"adapter weights not found in {adapter_dir}: expected {WEIGHTS_NAME}")
    check_finite(tensors, f"adapter weights in {adapter_dir}",
                 "the file is corrupt, or the run that wrote it diverged: train it again")
    pairs = _tensor_pairs(tensors, adapter_dir)
    _check_modules(config, pairs, set(targetable(model)))
    return AdapterFiles(adapter_dir, config, extra, pairs)


def load_adapter(model: nn.Module, adapter: str | Path, base_model: str | None = None, name: str = "default",
                 activate: bool = True) -> LoRAConfig:
    """Read and attach a PEFT-format LoRA adapter (directory or hub id) as adapter ``name``; ``activate`` makes it
    the model's only active adapter. Returns the settings loaded, as the layers were built: our sliced layout where
    the metadata names it and the weights fit it, else PEFT's whole-module adapter with its own rank."""
    return attach_adapter(model, read_adapter(model, adapter, base_model), name, activate)


def attach_adapter(model: nn.Module, files: AdapterFiles, name: str, activate: bool) -> LoRAConfig:
    """:func:`load_adapter`'s second half: attach an adapter already read by :func:`read_adapter`."""
    config, extra = files.config, files.extra
    if any(name in m.lora for _, m in lora_layers(model)):
        raise CheckpointError(f"the model already has an adapter named {name!r}: load this one under another name")
    modules = dict(model.named_modules())
    before = next((m.active for _, m in lora_layers(model)), [])
    built = {n: _build_update(config, extra, n, modules[n], pair) for n, pair in files.pairs.items()}
    for module_name, (update, base) in built.items():  # all built and checked first: a bad tensor changes nothing
        if isinstance(base, LoRALinear):
            base.lora[name] = update
        else:
            replace_module(model, module_name, _wrap(base, update, name))
    for _, layer in lora_layers(model):
        layer.set_active([name] if activate else before)
    _check_base_fit(model, name, files.adapter_dir, extra)
    return _loaded_config(config, extra, {n: u for n, (u, _) in built.items()})


def _tensor_pairs(tensors: dict[str, torch.Tensor], adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"A": lora_A, "B": lora_B}} from PEFT's tensor names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(PREFIX))
        if not match:
            raise CheckpointError(f"{adapter_dir}: unexpected tensor {key!r} (only lora_A / lora_B "
                                  f"weights{_EXTRA_TEXT} are supported)")
        pairs.setdefault(match["module"], {})[match["extra"] or match["which"]] = tensor
    for name, pair in pairs.items():
        if not {"A", "B"} <= set(pair):
            raise CheckpointError(f"adapter tensors for {name} are incomplete: need lora_A and lora_B")
    return pairs


def _check_modules(config: dict[str, Any], pairs: dict, linears: set[str]) -> None:
    """The weights, the config's targets and the model's layers must name the same modules."""
    absent = sorted(set(pairs) - linears)
    if absent:
        raise CheckpointError(f"adapter targets modules this model does not have: {', '.join(absent[:3])}; it was "
                              f"made for another architecture{_base_named(config)}: load it onto the model it was "
                              "trained on")
    targeted = {n for n in linears if is_targeted(config, n)}
    missing = sorted(targeted - set(pairs))
    if missing or not pairs:
        raise CheckpointError(f"adapter_config targets {', '.join(missing[:3]) or config.get('target_modules')} "
                              "but the weights hold no tensors for them")
    untargeted = sorted(set(pairs) - targeted)
    if untargeted:
        raise CheckpointError(f"the weights hold tensors for {', '.join(untargeted[:3])}, which adapter_config does "
                              f"not target (target_modules {config.get('target_modules')!r})")


def _base_named(config: dict[str, Any]) -> str:
    base = config.get("base_model_name_or_path")
    return f" (adapter_config names {base!r})" if isinstance(base, str) and base else ""


def _build_update(config: dict[str, Any], extra: dict[str, Any], name: str, base: nn.Module,
                  pair: dict[str, torch.Tensor]) -> tuple[LoRAUpdate, nn.Module]:
    """The update holding PEFT's tensors for module ``name`` (checked against its shape), and the base."""
    in_f, out_f = features(base)
    a, b = pair["A"], pair["B"]
    r = pattern_value(config.get("rank_pattern"), name, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        raise CheckpointError(f"adapter tensors for {name} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                              f"this model's layer is {in_f} -> {out_f}: the adapter was made for a base model of "
                              f"another shape{_base_named(config)}: load it onto that model")
    if a.shape[0] != r:
        raise CheckpointError(f"adapter tensors for {name} have rank {a.shape[0]}, adapter_config says {r}")
    for cls in VARIANTS.values():  # each variant's flag and its extra tensors go together
        if cls.peft_flag:
            says, held = bool(config.get(cls.peft_flag)), any(k in pair for k in cls.peft_extra)
            if says != held:
                raise CheckpointError(f"adapter_config says {cls.peft_flag}={says} but the weights "
                                      f"{'hold' if held else 'lack'} {cls.peft_extra_named} for {name}")
    cls = variant_class(flagged(config))
    update = _update_from_peft(cls, in_f, out_f, a, b, r, alpha, bool(config.get("use_rslora", False)),
                               float(config.get("lora_dropout") or 0.0), extra.get("slices", {}).get(name))
    device = next(itertools.chain(base.parameters(), base.buffers())).device
    update.to(device)
    update.load_peft_extra({k: pair[k] for k in cls.peft_extra}, name)
    return update, base


def _loaded_config(config: dict[str, Any], extra: dict[str, Any], updates: dict[str, LoRAUpdate]) -> LoRAConfig:
    """The LoRAConfig of the layers built: our recorded settings if every layer kept its sliced layout,
    else PEFT's (the rank and alpha of the whole-module adapter that was loaded)."""
    slices = extra.get("slices", {})
    restored = all(list(u.slices) == list(slices.get(n, {WHOLE: None})) for n, u in updates.items())
    if extra.get("lora") and restored:
        return LoRAConfig(**extra["lora"])
    targets = config["target_modules"]
    targets = targets if isinstance(targets, list) else ["re:" + targets]
    return LoRAConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout") or 0.0), targets=list(targets),
                      rslora=bool(config.get("use_rslora", False)),
                      **{cls.peft_flag: bool(config.get(cls.peft_flag)) for cls in VARIANTS.values() if cls.peft_flag})


def _update_from_peft(cls, in_f, out_f, a, b, r, alpha, rslora, dropout, slices) -> LoRAUpdate:
    """A LoRAUpdate holding PEFT's (A, B); our own sliced layout where the metadata names it and B fits it."""
    if slices:
        spans = {n: tuple(v) for n, v in slices.items()}
        s = len(spans)
        sub_r = r // s
        block = torch.zeros_like(b)
        for i, (start, stop) in enumerate(spans.values()):
            block[start:stop, i * sub_r:(i + 1) * sub_r] = b[start:stop, i * sub_r:(i + 1) * sub_r]
        if r % s == 0 and torch.equal(block, b):
            sub_alpha = alpha / (math.sqrt(s) if rslora else s)
            update = cls(in_f, out_f, sub_r, sub_alpha, dropout, rslora, spans)
            with torch.no_grad():
                for i, (n, (start, stop)) in enumerate(spans.items()):
                    update.lora_A[n].copy_(a[i * sub_r:(i + 1) * sub_r])
                    update.lora_B[n].copy_(b[start:stop, i * sub_r:(i + 1) * sub_r])
            return update
    update = cls(in_f, out_f, r, alpha, dropout, rslora, None)
    with torch.no_grad():
        update.lora_A[WHOLE].copy_(a)
        update.lora_B[WHOLE].copy_(b)
    return update


def _wrap(base: nn.Module, update: LoRAUpdate, name: str) -> LoRALinear:
    """A LoRALinear over ``base`` holding ``update`` as its only adapter ``name``."""
    transposed = bool(linear_kind(base))
    if getattr(base, "is_quantized", False):
        layer = LoRALinear(None, None, None, quant=base)
    else:
        layer = LoRALinear(base.weight, base.bias, None, fan_in_fan_out=transposed)
    layer.lora[name] = update
    return layer


def _check_base_fit(model: nn.Module, name: str, adapter_dir: Path, extra: dict[str, Any]) -> None:
    """Warn when adapter ``name`` does not fit this base, for the variants that distort a base they do not fit
    (DoRA: see :meth:`~.dora.DoRAUpdate.base_fit`); the fingerprint saved with ours is compared when present."""
    gaps = []
    for n, m in lora_layers(model):
        u = m.lora[name] if name in m.lora else None
        if u is None or not u.fingerprint_key:
            continue
        saved = extra.get(u.fingerprint_key)
        if saved and n not in saved:
            continue
        fit = u.base_fit(m.base_weight(), saved[n] if saved else None)
        if fit is not None:
            gaps.append((fit[0], n, fit[1], fit[2], u.title))
    worst = max(gaps, default=None)
    if worst and worst[0] > worst[3]:
        log.warning(f"{worst[4]} adapter {adapter_dir} does not fit this base: at {worst[1]} the {worst[2]} "
                    f"{worst[0]:.0%}; it was trained on another base model or checkpoint and will distort this one's "
                    "outputs")
