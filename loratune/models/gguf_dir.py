"""A GGUF file as a model directory, so every command takes ``--model path/to/model.gguf``.

Reading a GGUF builds, once per file, a small directory in loratune's cache (``$LORATUNE_CACHE``,
else ``$XDG_CACHE_HOME/loratune`` or ``~/.cache/loratune``) holding what a Hugging Face model
directory holds besides its weights: ``config.json`` rebuilt from the metadata, ``tokenizer.json``
and ``tokenizer_config.json`` (with the chat template) rebuilt from the tokenizer metadata,
``generation_config.json``, and ``gguf.json`` naming the GGUF file. The weights stay in the GGUF
and are read from it (:func:`read_gguf_weights`); nothing is written beside the input.

The cache entry is named by the file's resolved path, size and modification time, so a changed
file gets a fresh entry; it is written complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..hub.files import read_json
from ..hub.gguf_file import GGUFBlocks, GGUFFile, is_gguf_path, read_gguf
from ..hub.resolve import resolve_model_dir
from ..runtime.fsutil import atomic_dir
from .gguf import _gguf_names, common_config, from_gguf, gguf_blocks
from .registry import family_for_gguf

SOURCE_FILE = "gguf.json"
"""In a GGUF's model directory: which file holds the weights."""


def cache_root() -> Path:
    env = os.environ.get("LORATUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loratune"


def resolve_model(name_or_path: str | Path) -> Path:
    """A local model directory for a model argument: a GGUF file's (built in the cache), or a Hugging
    Face directory or hub id's (:func:`loratune.hub.resolve.resolve_model_dir`)."""
    if is_gguf_path(name_or_path):
        return gguf_model_dir(name_or_path)
    return resolve_model_dir(name_or_path)


def gguf_config(file: GGUFFile) -> tuple[Any, dict[str, Any]]:
    """(the family spec, the config.json dict) a GGUF's metadata describes."""
    if file.file_type == "adapter":
        raise CheckpointError(f"{file.path} is a LoRA adapter GGUF, not a model: pass the base model as --model "
                              "and this file as --adapter")
    family = family_for_gguf(file.architecture, file.get("general.name"))
    hf = family.gguf.config(file, common_config(file, family.model_type))
    try:
        config = family.config_from_hf(hf)
    except CheckpointError as exc:
        raise CheckpointError(f"{file.path}: the metadata describes no valid {family.display_name}: {exc}") from None
    return family, family.config_to_hf(config)


def gguf_model_dir(path: str | Path) -> Path:
    """The cache directory standing for GGUF file ``path`` (built on first use)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}" if not path.exists() else f"{path} is not a file")
    real = path.resolve()
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache_root() / "gguf" / f"{real.stem[:60]}-{key}"
    if (final / SOURCE_FILE).is_file():
        return final
    file = read_gguf(real)
    family, hf = gguf_config(file)
    from ..hub.gguf_tokenizer import tokenizer_files

    tok_json, tok_config = tokenizer_files(file.metadata)
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    stops = [file.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(s for s in stops if isinstance(s, int) and not isinstance(s, bool)))
    if stops:
        generation["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    source = {"file": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "architecture": file.architecture, "model_type": family.model_type}
    with atomic_dir(final) as tmp:
        for name, data in (("config.json", hf), ("tokenizer.json", tok_json), ("tokenizer_config.json", tok_config),
                           ("generation_config.json", generation), (SOURCE_FILE, source)):
            (tmp / name).write_text(json.dumps(data, ensure_ascii=False, indent=1 if name != "tokenizer.json" else None),
                                    encoding="utf-8")
    return final


def is_gguf_dir(model_dir: Path | str) -> bool:
    """Whether a model directory stands for a GGUF file (it holds the pointer; nothing is read)."""
    return (Path(model_dir) / SOURCE_FILE).is_file()


def gguf_source(model_dir: Path) -> GGUFFile | None:
    """The GGUF file a model directory stands for, read and checked; None for a Hugging Face directory."""
    pointer = Path(model_dir) / SOURCE_FILE
    if not pointer.is_file():
        return None
    source = read_json(pointer, SOURCE_FILE)
    path = Path(str(source.get("file", "")))
    if not path.is_file():
        raise CheckpointError(f"the GGUF file {path} that {model_dir} stands for is gone: pass the file again")
    stat = path.stat()
    if (stat.st_size, stat.st_mtime_ns) != (source.get("size"), source.get("mtime_ns")):
        raise CheckpointError(f"{path} changed since {model_dir} was built from it: pass the GGUF file itself "
                              "as --model, which rebuilds it")
    return read_gguf(path)


def read_gguf_weights(model_dir: Path, family, config, dtype: torch.dtype | None) -> Mapping[str, torch.Tensor]:
    """The weights of a GGUF model directory under transformers' names, each dequantized (float32 unless
    ``dtype``) when it is looked up: a loader holds one dequantized tensor at a time (the file stays mapped)."""
    file = gguf_source(model_dir)
    hf = read_json(Path(model_dir) / "config.json", "config.json")
    return GGUFWeights(file, family, hf, _gguf_names(file, family, config), dtype)


class GGUFWeights(Mapping[str, torch.Tensor]):
    """A GGUF's weights under transformers' names, dequantized one lookup at a time, as
    :func:`~loratune.models.gguf.gguf_state_dict` dequantizes them all (the same values, bit for bit)."""

    def __init__(self, file: GGUFFile, family, hf: dict[str, Any], names: dict[str, str],
                 dtype: torch.dtype | None) -> None:
        self._file, self._family, self._hf, self._dtype = file, family, hf, dtype
        self._gguf_name = {h: g for g, h in names.items()}  # in the file's order

    def __getitem__(self, name: str) -> torch.Tensor:
        t = from_gguf(self._family.gguf, self._hf, name,
                      self._file.tensors[self._gguf_name[name]].dequantize(torch.float32))
        return t if self._dtype is None else t.to(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._gguf_name)

    def __len__(self) -> int:
        return len(self._gguf_name)


def read_gguf_blocks(model_dir: Path, family, config) -> dict[str, GGUFBlocks]:
    """The quantized weights of a GGUF model directory as their blocks (for a base kept quantized)."""
    file = gguf_source(model_dir)
    if file is None:
        raise CheckpointError(f"{model_dir} is not a GGUF model: its quantization cannot be kept (use "
                              "quantize: nf4 or int8)")
    hf = read_json(Path(model_dir) / "config.json", "config.json")
    return gguf_blocks(file, family, config, hf)
