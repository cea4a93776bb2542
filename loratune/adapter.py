"""Adapters in the PEFT format, both ways: what vLLM, TGI, LoRAX, transformers and PEFT read.

A directory with ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``,
``target_modules`` ...) and ``adapter_model.safetensors`` holding
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r) under the
Hugging Face module names of the base model. Our own extras go to ``loratune_adapter.json``,
which PEFT ignores.

GPT-2's q and v *slices* of the fused ``c_attn`` have no PEFT twin, so they are written as the
exactly equivalent whole-``c_attn`` adapter: A stacked ``[A_q; A_v]`` (rank S*r), B block-shaped
with zero rows for k, and alpha scaled so alpha'/r' (or alpha'/sqrt(r') with rsLoRA) is our
scale. ``loratune_adapter.json`` records the slices, so loading here restores them exactly.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import is_hub_id, read_json, read_pickled_tensors, read_safetensors
from .errors import CheckpointError
from .fsutil import atomic_dir
from .lora import WHOLE, LoRAConfig, LoRALinear, lora_layers
from .targets import linear_kind, suffix_match

log = logging.getLogger("loratune")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
EXTRA_NAME = "loratune_adapter.json"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")
# keys PEFT writes that we read and honour; anything else is accepted with a warning, as PEFT does
_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
          "fan_in_fan_out", "use_rslora", "bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
          "layers_pattern", "inference_mode", "init_lora_weights", "modules_to_save", "use_dora", "revision",
          "peft_version", "auto_mapping", "exclude_modules", "lora_bias", "megatron_config", "megatron_core",
          "loftq_config", "eva_config", "corda_config", "layer_replication", "use_qalora", "qalora_group_size",
          "trainable_token_indices", "target_parameters", "ensure_weight_tying", "alora_invocation_tokens",
          "arrow_config", "kasa_config", "lora_ga_config", "monteclora_config", "use_bdlora", "velora_config"}
# features whose adapters would compute something else here: refuse them clearly
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA",
                "layer_replication": "layer replication", "target_parameters": "targeting raw parameters",
                "trainable_token_indices": "trainable token embeddings", "alora_invocation_tokens": "aLoRA"}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the LoRA tensors of ``model`` under its own state-dict keys (``...c_attn.lora_A.q``)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def _peft_tensors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One layer's (A, B, alpha) as PEFT's single whole-projection adapter with the same scale:
    the stacked A (S*r, in), the block B (out, S*r) and alpha scaled so alpha'/r' (or /sqrt(r'))
    equals ours (unchanged for one whole-projection slice)."""
    with torch.no_grad():
        a, b = layer.stacked_A().detach(), layer.stacked_B(scaled=False).detach()
    s = len(layer.slices)
    return a, b, layer.alpha * (math.sqrt(s) if layer.rslora else s)


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


def peft_adapter(model: nn.Module, lora: LoRAConfig, base_model: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A pure conversion: (adapter_config.json dict, adapter_model tensors) for the model's LoRA layers."""
    layers = list(lora_layers(model))
    if not layers:
        raise CheckpointError("the model has no LoRA layers to save")
    if any(m.merged for _, m in layers):
        raise CheckpointError("cannot save a merged adapter: unmerge first")
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers:
        a, b, alpha = _peft_tensors(layer)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.float().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.float().contiguous().cpu()
        ranks[name], alphas[name] = a.shape[0], alpha
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[n] for n in ranks if ranks[n] == r).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": r, "lora_alpha": alpha, "lora_dropout": lora.dropout,
        "target_modules": _target_modules(model, list(ranks)),
        "fan_in_fan_out": getattr(model, "model_type", None) == "gpt2" or any(m.fan_in_fan_out for _, m in layers),
        "use_rslora": lora.rslora, "bias": "none", "use_dora": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha or ranks[n] != r},
    }
    return config, tensors


def save_adapter(model: nn.Module, out_dir: str | Path, lora: LoRAConfig, base_model: str) -> Path:
    """Write a PEFT-format adapter directory (atomically: complete or absent); returns it."""
    config, tensors = peft_adapter(model, lora, base_model)
    extra = {"format_version": 1, "lora": asdict(lora), "base_model": str(base_model),
             "slices": {n: m.slices for n, m in lora_layers(model) if list(m.slices) != [WHOLE]},
             "base_config": model.config.to_hf() if hasattr(model, "config") and hasattr(model.config, "to_hf") else None}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / EXTRA_NAME).write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
    return out


def resolve_adapter_dir(name_or_path: str | Path) -> Path:
    """A local adapter directory, downloading a hub id if needed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or not is_hub_id(text):
        raise CheckpointError(f"adapter directory {text} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, EXTRA_NAME]))
    except Exception as exc:
        raise CheckpointError(f"could not fetch adapter {text!r} from the hub ({type(exc).__name__}: {exc})") from None


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    if (adapter_dir / WEIGHTS_NAME).is_file():
        return read_safetensors(adapter_dir / WEIGHTS_NAME)
    if (adapter_dir / PICKLE_WEIGHTS_NAME).is_file():
        return read_pickled_tensors(adapter_dir / PICKLE_WEIGHTS_NAME)
    raise CheckpointError(f"adapter weights not found in {adapter_dir}: expected {WEIGHTS_NAME}")


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {what} ({key}) is not supported by loratune yet")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={config['bias']!r} adapters (trained biases) are not supported")
    if config.get("modules_to_save"):
        raise CheckpointError(f"{path}: modules_to_save {config['modules_to_save']} (fully trained extra modules) "
                              "is not supported")
    unknown = sorted(set(config) - _KNOWN)
    if unknown:
        log.warning(f"{path}: ignoring unknown adapter_config keys {', '.join(unknown)}")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        log.warning(f"{path}: task_type is {config.get('task_type')!r}, expected CAUSAL_LM")
    for key in ("r", "lora_alpha"):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")


def _check_fields(config: dict[str, Any], extra: dict[str, Any], path: Path) -> None:
    """Types and ranges of every field the loader uses, so a malformed file is a CheckpointError, not a crash."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {key} must be {what}, got {config.get(key)!r}")

    def regex_ok(text: Any) -> bool:
        try:
            return isinstance(text, str) and re.compile(text) is not None
        except re.error:
            return False

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf

    def int_ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not int_ok(config.get("r")):
        raise bad("r", "a positive integer")
    if not number(config.get("lora_alpha")):
        raise bad("lora_alpha", "a positive number")
    dropout = config.get("lora_dropout")
    if dropout is not None and (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
                                or not 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        value = config.get(key)
        if (value is None and key != "target_modules") or regex_ok(value):
            continue
        names_ok = regex_ok if key == "layers_pattern" else (lambda v: isinstance(v, str))  # that one joins a regex
        if not (isinstance(value, list) and all(names_ok(v) for v in value)):
            raise bad(key, "a regular expression or a list of module names" + (" or null" if key != "target_modules"
                                                                               else ""))
    layers = config.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise bad("layers_to_transform", "a layer index, a list of them, or null")
    for key, ok in (("rank_pattern", int_ok), ("alpha_pattern", number)):
        value = config.get(key)
        if value is not None and not (isinstance(value, dict) and all(regex_ok(k) and ok(v) for k, v in value.items())):
            raise bad(key, "a mapping of module-name patterns to " + ("ranks" if key == "rank_pattern" else "alphas"))
    if not isinstance(config.get("use_rslora", False), (bool, type(None))):
        raise bad("use_rslora", "true or false")
    slices = extra.get("slices", {})
    if not isinstance(slices, dict) or not all(
            isinstance(spans, dict) and spans and all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                for v in spans.values()) for spans in slices.values()):
        raise CheckpointError(f"{path.with_name(EXTRA_NAME)}: 'slices' must map module names to "
                              "{slice name: [start, stop]}")
    lora = extra.get("lora")
    if lora is not None and not (isinstance(lora, dict) and set(lora) <= {f.name for f in fields(LoRAConfig)}):
        raise CheckpointError(f"{path.with_name(EXTRA_NAME)}: 'lora' must hold LoRAConfig fields, got {lora!r}")


def _targeted(config: dict[str, Any], name: str) -> bool:
    """PEFT's rule for whether module ``name`` is a target (list = suffix, str = full regex)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and any(suffix_match(name, e) for e in exclude):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not isinstance(targets, list) or not any(suffix_match(name, t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else (pattern or [])
    match = None
    for p in patterns or [None]:
        regex = rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." if p else r".*?\.[^.]*\.(?P<idx>\d+)\."
        match = re.match(regex, name)
        if match:
            break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def load_adapter(model: nn.Module, adapter: str | Path, base_model: str | None = None) -> LoRAConfig:
    """Attach a PEFT-format LoRA adapter (directory or hub id) to ``model``; returns its LoRA settings.

    Checks that every tensor fits a module of this model (another architecture or hidden size is an
    error, not a silent mis-load) and that the config and the weights name the same modules.
    """
    adapter_dir = resolve_adapter_dir(adapter)
    path = adapter_dir / CONFIG_NAME
    config = read_json(path, "adapter config")
    _check_config(config, path)
    extra = read_json(adapter_dir / EXTRA_NAME, "loratune metadata") if (adapter_dir / EXTRA_NAME).is_file() else {}
    _check_fields(config, extra, path)
    saved_base = config.get("base_model_name_or_path")
    if base_model and saved_base and str(saved_base) != str(base_model):
        log.warning(f"adapter was trained on {saved_base!r}, applying it to {base_model!r}")
    tensors = _read_adapter_tensors(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key[len(PREFIX):] if key.startswith(PREFIX) else key)
        if not match:
            raise CheckpointError(f"{adapter_dir}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    modules = dict(model.named_modules())
    linears = {n for n, m in modules.items() if linear_kind(m) is not None}
    targeted = {n for n in linears if _targeted(config, n)}
    absent = sorted(set(pairs) - linears)
    if absent:
        raise CheckpointError(f"adapter targets modules this model does not have: {', '.join(absent[:3])}; "
                              "was it made for another architecture?")
    missing = sorted(targeted - set(pairs))
    if missing or not pairs:
        raise CheckpointError(f"adapter_config targets {', '.join(missing[:3]) or config.get('target_modules')} "
                              "but the weights hold no tensors for them")
    untargeted = sorted(set(pairs) - targeted)
    if untargeted:
        raise CheckpointError(f"the weights hold tensors for {', '.join(untargeted[:3])}, which adapter_config does "
                              f"not target (target_modules {config.get('target_modules')!r})")
    rslora = bool(config.get("use_rslora", False))
    slices = extra.get("slices", {})
    layers = {}  # built and checked all first, so a bad tensor leaves the model untouched
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"adapter tensors for {name} are incomplete: need lora_A and lora_B")
        base = modules[name]
        transposed = bool(linear_kind(base))
        out_f, in_f = base.weight.shape[::-1] if transposed else base.weight.shape
        a, b = pair["A"], pair["B"]
        r = _pattern_value(config.get("rank_pattern"), name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"adapter tensors for {name} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                  f"this model's layer is {in_f} -> {out_f}: the adapter was made for another base model")
        if a.shape[0] != r:
            raise CheckpointError(f"adapter tensors for {name} have rank {a.shape[0]}, adapter_config says {r}")
        layers[name] = _layer_from_peft(base, a, b, r, alpha, rslora, float(config.get("lora_dropout") or 0.0),
                                        slices.get(name), transposed)
    if extra.get("lora"):
        lora = LoRAConfig(**extra["lora"])
    else:
        targets = config["target_modules"]
        targets = targets if isinstance(targets, list) else ["re:" + targets]
        lora = LoRAConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                          dropout=float(config.get("lora_dropout") or 0.0), targets=list(targets), rslora=rslora)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer)
    return lora


def _layer_from_peft(base, a, b, r, alpha, rslora, dropout, slices, transposed) -> LoRALinear:
    """A LoRALinear holding PEFT's (A, B); our own sliced layout where the metadata names it and B fits it."""
    if slices:
        spans = {n: tuple(v) for n, v in slices.items()}
        s = len(spans)
        sub_r = r // s
        block = torch.zeros_like(b)
        for i, (start, stop) in enumerate(spans.values()):
            block[start:stop, i * sub_r:(i + 1) * sub_r] = b[start:stop, i * sub_r:(i + 1) * sub_r]
        if r % s == 0 and torch.equal(block, b):
            sub_alpha = alpha / (math.sqrt(s) if rslora else s)
            layer = LoRALinear(base.weight, base.bias, sub_r, sub_alpha, dropout, rslora, spans, transposed)
            with torch.no_grad():
                for i, (n, (start, stop)) in enumerate(spans.items()):
                    layer.lora_A[n].copy_(a[i * sub_r:(i + 1) * sub_r])
                    layer.lora_B[n].copy_(b[start:stop, i * sub_r:(i + 1) * sub_r])
            return layer
    layer = LoRALinear(base.weight, base.bias, r, alpha, dropout, rslora, None, transposed)
    with torch.no_grad():
        layer.lora_A[WHOLE].copy_(a)
        layer.lora_B[WHOLE].copy_(b)
    return layer  # LoRALinear makes A and B on the base weight's device
