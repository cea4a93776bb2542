"""Write a model as a complete Hugging Face model directory that transformers loads unchanged.

The writer knows a model only by what it offers: ``to_hf_state_dict()`` for the weights under
transformers' keys, ``family.config_to_hf`` for config.json, and ``merged`` on a layer that holds an
update outside its weight (an adapter layer). So ``hub`` imports nothing from the packages above it.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError
from ..runtime.finite import check_finite
from ..runtime.fsutil import atomic_dir
from .files import TOKENIZER_FILES

LORATUNE_KEY = "loratune"
"""config.json key of loratune's own record (transformers keeps unknown keys as plain attributes)."""
GENERATION_CONFIG = "generation_config.json"


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip()
    i = len(number)
    while i and not (number[i - 1].isdigit() or number[i - 1] == "."):
        i -= 1
    try:
        value, unit = float(number[:i]), number[i:].strip()
        if unit not in units or value <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"cannot read size {text!r}; use e.g. 2GB, 500MB or 1GiB") from None
    return int(value * units[unit])


def shard_state(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors, in order, into groups of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None) -> None:
    shards = shard_state(state, max_shard_bytes) if max_shard_bytes else [state]
    if len(shards) == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def merged_adapters(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The adapters already merged into a model directory, oldest first, as its config.json records them.

    Why: merged weights carry no trace of the adapter, so without this record merging the same
    adapter again would silently apply its update twice.
    """
    block = config.get(LORATUNE_KEY)
    entries = block.get("merged_adapters") if isinstance(block, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def with_merged_adapter(config: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` whose ``loratune.merged_adapters`` list ends with ``entry`` (earlier ones kept)."""
    new = copy.deepcopy(config)
    block = new.get(LORATUNE_KEY) if isinstance(new.get(LORATUNE_KEY), dict) else {}
    block["merged_adapters"] = [*merged_adapters(config), entry]
    new[LORATUNE_KEY] = block
    return new


def export_config(model, base_config: dict[str, Any] | None, dtype: torch.dtype) -> dict[str, Any]:
    """The exported config.json: the base model's own, changed only where the export changed it.

    Why: our typed config knows only the fields our model uses; rebuilding config.json from it
    would reset the rest (GPT-2's attn/resid/embd dropout go to 0.0) and drop keys other tools
    read. So the base dict is kept, with the weights' dtype written (``torch_dtype``, which older
    transformers read, and ``dtype`` where the base has it) and ``architectures`` filled in if
    missing. Without a base (``init-model``) the model's own config is written.
    """
    fresh = model.family.config_to_hf(model.config)
    config = fresh if base_config is None else copy.deepcopy(base_config)
    if not config.get("architectures"):
        config["architectures"] = fresh["architectures"]
    name = str(dtype).replace("torch.", "")
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    return config


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The floating-point dtype a config.json states for its weights (``dtype``, or the older
    ``torch_dtype``), or None where it states none we know.

    Why: a merge computes in float32, but a bfloat16 base should come out bfloat16 again, not
    twice its size with a config.json that no longer says what the base said.
    """
    for key in ("dtype", "torch_dtype"):
        dtype = getattr(torch, str(config.get(key)), None) if isinstance(config.get(key), str) else None
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return None


def save_hf_model(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                  dtype: torch.dtype | None = None, max_shard_size: str | int | None = None,
                  base_config: dict[str, Any] | None = None, base_dir: str | Path | None = None) -> Path:
    """Save config.json, model.safetensors (sharded with an index past ``max_shard_size``),
    generation_config.json and the tokenizer files.

    ``base_config`` is the config.json dict of the model directory the model was loaded from: it is
    written back with only the fields the export changes (see :func:`export_config`).
    ``base_dir`` is that directory: its generation_config.json (several eos ids,
    sampling defaults) is copied unchanged; without one, bos and eos come from the model's config.
    LoRA layers must be merged first (their update would otherwise be lost). The directory is
    written under a temporary name and renamed, so it is complete or absent (a full disk raises
    the ``OSError`` it is, whatever the writer called it: see ``fsutil.write_os_error``).
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_hf_model(model, tmp, tokenizer_dir, dtype, max_shard_size, base_config, base_dir, shown_as=out)
    return out


def write_hf_model(model, directory: Path, tokenizer_dir: str | Path | None = None, dtype: torch.dtype | None = None,
                   max_shard_size: str | int | None = None, base_config: dict[str, Any] | None = None,
                   base_dir: str | Path | None = None, shown_as: Path | None = None) -> None:
    """What :func:`save_hf_model` writes, into an existing (temporary) ``directory``: for a caller that
    adds files of its own before the whole directory is renamed into place (``init-model``'s tokenizer).
    ``shown_as`` is the final path, for messages."""
    if _unmerged_layers(model):
        raise CheckpointError("the model has unmerged LoRA layers: merge them before exporting")
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.to_hf_state_dict().items()}
    check_finite(state, f"the model to write to {shown_as or directory}", "nothing was written")  # also a bf16 overflow
    _write_weights(state, directory, parse_size(max_shard_size) if max_shard_size else None)
    config = export_config(model, base_config, next(iter(state.values())).dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _write_generation_config(model, directory, base_dir)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and name != GENERATION_CONFIG:
                shutil.copyfile(src, directory / name)


def _unmerged_layers(model) -> list[str]:
    """Layers whose update lives outside their weight (an adapter layer with ``merged`` False): their
    update is not in ``to_hf_state_dict()``, so exporting them would silently drop it."""
    return [name for name, m in model.named_modules() if getattr(m, "merged", None) is False]


def _write_generation_config(model, out: Path, base_dir: str | Path | None) -> None:
    src = Path(base_dir) / GENERATION_CONFIG if base_dir is not None else None
    if src is not None and src.is_file():
        shutil.copyfile(src, out / GENERATION_CONFIG)
        return
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    (out / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
