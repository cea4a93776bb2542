"""Read Hugging Face checkpoint files: JSON, safetensors (single or sharded), and pickles safely.

Pickled weights (``pytorch_model.bin``) are only read with ``torch.load(weights_only=True)``,
which refuses to run code hidden in the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object file, with errors that name the file."""
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    return read_json(model_dir / "config.json", "config.json")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a corrupt or truncated file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                              "it may be truncated or corrupt: download or save it again") from None


def read_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A dict of tensors from a pickle file, with ``weights_only=True``: code hidden in it is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"refusing to load {path}: it is corrupt or holds more than tensors "
                              f"(weights_only=True rejected it: {str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return state


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks: identifies an adapter's weights whatever its path."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights: model.safetensors, a sharded index, or (safely) pytorch_model.bin.

    Where a directory holds several of them (hub repos often ship both safetensors and a pickle),
    the first of :data:`WEIGHT_FILES` wins, and a log line says which file was read and which
    were ignored, so that a user who edited the other file learns why it had no effect.
    """
    present = [name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not present:
        raise CheckpointError(f"no weights in {model_dir}: expected one of {', '.join(WEIGHT_FILES)}")
    used, ignored = present[0], present[1:]
    if ignored:
        log.info(f"{model_dir} holds {', '.join(present)}: reading {used}, ignoring {', '.join(ignored)}")
    if used == "model.safetensors":
        return read_safetensors(model_dir / used)
    if used == "model.safetensors.index.json":
        return _read_sharded(model_dir, model_dir / used)
    return read_pickled_tensors(model_dir / used)


def _read_sharded(model_dir: Path, index: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v and "\0" not in v
                                                   for v in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to shard file names")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = (model_dir / shard).resolve()  # symlinks followed: a link out of the directory is refused too
        if model_dir.resolve() not in shard_path.parents:
            raise CheckpointError(f"{index} names a shard outside the checkpoint directory: {shard}")
        state.update(read_safetensors(shard_path))
    return state
