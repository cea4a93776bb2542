"""A llama.cpp LoRA adapter GGUF read as our LoRA weights, so ``--adapter path.gguf`` works wherever
``--adapter`` does (generate, eval, serve, merge).

The file is what ``convert_lora_to_gguf.py`` (or ``loratune export``) writes: ``general.type=adapter``,
``adapter.type=lora``, ``adapter.lora.alpha``, and pairs ``<base tensor>.lora_a`` (r, in) and
``.lora_b`` (out, r) in torch order. Read back, each pair becomes PEFT's (A, B) on the module whose
transformers name maps to that base tensor (:func:`~loratune.models.gguf.name_map`), B's q/k rows
un-permuted as the base's are (:func:`~loratune.models.gguf.from_gguf`), with llama.cpp's scale:
``alpha / r`` with each pair's own rank (scale 1 where the file has no alpha or alpha 0, as llama.cpp).

It is checked against the base before anything is attached: the architecture equal to the base's
(llama.cpp refuses the same mismatch), every pair naming a layer the base has, at its shape; the
first mismatch is a one-line :class:`CheckpointError` naming it. LoRA on the token embeddings
(mergekit's, A and B flipped) has no LoRA layer here and is refused; ``*_norm.weight`` tensors,
which llama.cpp skips, are skipped with a warning.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..hub.gguf_file import read_gguf
from ..models.gguf import from_gguf, hf_names_of, name_map
from ..models.registry import family_of
from .targets import features, targetable

log = logging.getLogger("loratune")


def read_gguf_adapter(model: nn.Module, path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(an adapter_config.json dict, {module name: {"A": (r, in), "B": (out, r)}}) for the LoRA GGUF at
    ``path`` on ``model``, checked to fit it; float32 tensors on the CPU, the model untouched."""
    path = Path(path).expanduser()
    file = read_gguf(path)
    if file.file_type != "adapter" or file.get("adapter.type") != "lora":
        raise CheckpointError(f"{path} is not a LoRA adapter GGUF (general.type {file.file_type!r}, adapter.type "
                              f"{file.get('adapter.type')!r}): a model GGUF is passed as --model")
    if file.get("adapter.alora.invocation_tokens") is not None:
        raise CheckpointError(f"{path} is an activated LoRA (aLoRA: adapter.alora.invocation_tokens), which loratune "
                              "does not apply")
    found = family_of(model)
    facts = found[0].gguf if found else None
    if facts is None:
        name = found[0].display_name if found else type(model).__name__
        raise CheckpointError(f"{path} is a llama.cpp LoRA adapter, but the model is a {name}, which has no GGUF "
                              "form: load it onto the model it was made for")
    family, config = found
    if file.architecture != facts.arch:
        raise CheckpointError(f"{path} is a LoRA GGUF for another base: its general.architecture is "
                              f"{file.architecture!r}, this {family.display_name} model's is {facts.arch!r}")
    hf = family.config_to_hf(config)
    weights = [n for n in hf_names_of(family, config) if n.endswith(".weight")]
    modules_of = {g: h.removesuffix(".weight") for h, g in name_map(facts.arch, config.num_hidden_layers,
                                                                     weights).items()}
    layers = targetable(model)
    named = dict(model.named_modules())
    raw = _lora_pairs(file, path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for base, pair in raw.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{path}: the LoRA pair for {base} lacks its {'lora_b' if 'A' in pair else 'lora_a'}")
        module = modules_of.get(base)
        if isinstance(named.get(module), nn.Embedding):
            raise CheckpointError(f"{path} adapts the token embeddings ({base}), which loratune's LoRA layers "
                                  "(linear projections) cannot apply")
        if module is None or module not in layers:
            raise CheckpointError(f"{path} is a LoRA GGUF for another base: {base} is no layer of this "
                                  f"{family.display_name} model ({config.num_hidden_layers} layers)")
        in_f, out_f = features(layers[module])
        a_shape, b_shape = pair["A"].shape, pair["B"].shape
        if (len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f
                or a_shape[0] != b_shape[1]):
            raise CheckpointError(f"{path} is a LoRA GGUF for another base: {base}.lora_a is {tuple(a_shape)} and "
                                  f".lora_b {tuple(b_shape)}, but this model's {module} is {in_f} -> {out_f} "
                                  "(expected (r, in) and (out, r))")
        a = pair["A"].dequantize(torch.float32)
        b = from_gguf(facts, hf, f"{module}.weight", pair["B"].dequantize(torch.float32))
        pairs[module] = {"A": a.contiguous(), "B": b.contiguous()}
        ranks[module] = int(a_shape[0])
    return _peft_config(file.get("adapter.lora.alpha"), ranks, _targets(list(layers), set(pairs))), pairs


def _lora_pairs(file, path: Path) -> dict[str, dict[str, Any]]:
    """{base tensor name: {"A": its .lora_a, "B": its .lora_b}} as the file holds them (not yet checked)."""
    raw: dict[str, dict[str, Any]] = {}
    for name, tensor in file.tensors.items():
        base, dot, which = name.rpartition(".")
        if name.endswith("_norm.weight"):
            log.warning(f"{path}: skipping {name}, a norm tensor (llama.cpp skips it too)")
            continue
        if not dot or which not in ("lora_a", "lora_b"):
            raise CheckpointError(f"{path}: tensor {name!r} is neither a .lora_a nor a .lora_b: not a LoRA adapter")
        raw.setdefault(base, {})["A" if which == "lora_a" else "B"] = tensor
    if not raw:
        raise CheckpointError(f"{path} holds no lora_a/lora_b pairs")
    return raw


def _peft_config(alpha: Any, ranks: dict[str, int], targets: list[str]) -> dict[str, Any]:
    """The adapter_config.json that says what llama.cpp computes: scale alpha / r with each pair's rank r, or 1
    where the file has no alpha (or 0): then each module's alpha is its rank."""
    alpha = float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else 0.0
    r = Counter(ranks.values()).most_common(1)[0][0]
    alphas = {m: alpha or float(k) for m, k in ranks.items()}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": r, "lora_alpha": alpha or float(r), "lora_dropout": 0.0, "bias": "none",
        "target_modules": targets, "use_rslora": False, "modules_to_save": None,
        "rank_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != (alpha or float(r))},
    }


def _targets(linears: list[str], adapted: set[str]) -> list[str]:
    """PEFT's target_modules for ``adapted``: a kind's suffix (``q_proj``) where every layer of that kind is adapted,
    else the full names."""
    kinds: dict[str, list[str]] = {}
    for name in linears:
        kinds.setdefault(name.split(".")[-1], []).append(name)
    targets = []
    for kind, names in sorted(kinds.items()):
        chosen = [n for n in names if n in adapted]
        targets.extend([kind] if chosen and len(chosen) == len(names) else chosen)
    return targets
