"""Reading a PEFT ``adapter_config.json``: which keys are honoured, refused or ignored, which model
family the adapter was made for, and PEFT's rules for which modules an adapter targets and which
rank/alpha each gets (``rank_pattern``, ...)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hub.files import read_json
from ..models.registry import family_of, find_family
from .lora import LoRAConfig
from .targets import suffix_match

log = logging.getLogger("loratune")

EXTRA_NAME = "loratune_adapter.json"
# keys PEFT writes that we read and honour; anything else is accepted with a warning, as PEFT does
_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
          "fan_in_fan_out", "use_rslora", "bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
          "layers_pattern", "inference_mode", "init_lora_weights", "modules_to_save", "use_dora", "revision",
          "peft_version", "auto_mapping", "exclude_modules", "lora_bias", "megatron_config", "megatron_core",
          "loftq_config", "eva_config", "corda_config", "layer_replication", "use_qalora", "qalora_group_size",
          "trainable_token_indices", "target_parameters", "ensure_weight_tying", "alora_invocation_tokens",
          "arrow_config", "kasa_config", "lora_ga_config", "monteclora_config", "use_bdlora", "velora_config"}
# features whose adapters would compute something else here: refuse them clearly
_UNSUPPORTED = {"lora_bias": "LoRA bias terms", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA",
                "layer_replication": "layer replication", "target_parameters": "targeting raw parameters",
                "trainable_token_indices": "trainable token embeddings", "alora_invocation_tokens": "aLoRA"}



def check_adapter_config(config: dict[str, Any], extra: dict[str, Any], path: Path) -> None:
    """Refuse what loratune cannot apply exactly (trained biases, QALoRA, ...) and malformed fields; warn
    on keys PEFT knows and we ignore. ``extra`` is our own loratune_adapter.json (or {})."""
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
    _check_fields(config, extra, path)


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
    _check_extra(extra, path.with_name(EXTRA_NAME))


def _check_extra(extra: dict[str, Any], path: Path) -> None:
    """Our loratune_adapter.json: the slices and the LoRAConfig it records (a bad value names the file)."""
    slices = extra.get("slices", {})
    if not isinstance(slices, dict) or not all(
            isinstance(spans, dict) and spans and all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                for v in spans.values()) for spans in slices.values()):
        raise CheckpointError(f"{path}: 'slices' must map module names to {{slice name: [start, stop]}}")
    lora = extra.get("lora")
    if lora is not None and not (isinstance(lora, dict) and set(lora) <= {f.name for f in fields(LoRAConfig)}):
        raise CheckpointError(f"{path}: 'lora' must hold LoRAConfig fields, got {lora!r}")
    try:
        LoRAConfig(**(lora or {}))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: 'lora' holds an invalid value ({exc})") from None


def adapter_family(config: dict[str, Any], extra: dict[str, Any]) -> tuple[str, str] | None:
    """(model_type, where it was read) of the model the adapter was made for, where the adapter says.

    Our loratune_adapter.json records the base's config; a PEFT-made adapter names its base in
    ``base_model_name_or_path``, which is read when it is a local checkpoint directory.
    """
    base_config = extra.get("base_config")
    if isinstance(base_config, dict) and isinstance(base_config.get("model_type"), str):
        return base_config["model_type"], EXTRA_NAME
    base = config.get("base_model_name_or_path")
    path = Path(base).expanduser() / "config.json" if isinstance(base, str) and base else None
    if path is None or not path.is_file():
        return None
    try:
        model_type = read_json(path, "config.json").get("model_type")
    except CheckpointError:
        return None  # only a hint: the tensors' names and shapes are still checked
    return (model_type, str(path)) if isinstance(model_type, str) else None


def check_family(model: nn.Module, config: dict[str, Any], extra: dict[str, Any], adapter_dir: Path) -> None:
    """CheckpointError if the adapter was made for another model family than ``model``'s.

    Why: Llama, Mistral, Qwen and Gemma share module names (``model.layers.0.self_attn.q_proj``)
    and, at equal sizes, tensor shapes, so only the family says that an update trained on one
    means nothing on another.
    """
    try:
        found = family_of(model)
    except CheckpointError:  # a transformers model whose config our reader refuses: its names still decide
        found = None
    made_for = adapter_family(config, extra)
    if found is None or made_for is None or made_for[0] == found[0].model_type:
        return
    theirs = find_family(made_for[0])
    name = theirs.display_name if theirs else made_for[0]
    ours = found[0].display_name
    raise CheckpointError(f"{adapter_dir} is an adapter for a {name} model (model_type {made_for[0]!r} in "
                          f"{made_for[1]}), but this model is a {ours} ({found[0].model_type!r}): its update means "
                          f"nothing here. Load it onto the {name} model it was trained on, or train an adapter "
                          f"for this {ours} model")


def is_targeted(config: dict[str, Any], name: str) -> bool:
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
    for p in patterns or [None]:  # PEFT's regexes (0.21): lazy, so the FIRST numbered segment is the layer
        # index ('layers.1.experts.0' is layer 1, not expert 0); older releases were greedy
        regex = rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." if p else r".*?\.[^.]*\.(?P<idx>\d+)\."
        match = re.match(regex, name)
        if match:
            break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


