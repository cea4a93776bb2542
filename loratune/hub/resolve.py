"""Names to local directories: a path as it is, or a Hugging Face hub id downloaded into the HF cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError
from .files import TOKENIZER_FILES, WEIGHT_FILES

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
MODEL_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]
"""What a model download fetches first; a sharded model's shards follow, by the names its index lists
(not '*.safetensors': Mistral's repos also hold a consolidated.safetensors of the same weights)."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub repo id ('gpt2', 'openai-community/gpt2')."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory holding the model, downloading a hub id into the HF cache if needed."""
    path = _local_or_hub_id(name_or_path, "model directory", file_hint="pass the checkpoint directory that "
                                                                        "holds config.json")
    if isinstance(path, Path):
        return path
    local = download(path, MODEL_PATTERNS, what="model")
    if (local / "model.safetensors.index.json").is_file():
        local = download(path, MODEL_PATTERNS + shard_names(local / "model.safetensors.index.json"), what="model")
    elif not any((local / f).exists() for f in WEIGHT_FILES[:2]):  # an old repo with pickled weights only
        local = download(path, MODEL_PATTERNS + ["pytorch_model.bin"], what="model")
    return local


def shard_names(index: Path) -> list[str]:
    """The shard files a safetensors index names (what to download next); [] if it names none."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return []  # reading the weights later reports what is wrong with the index
    return sorted({v for v in weight_map.values() if isinstance(v, str)}) if isinstance(weight_map, dict) else []


def resolve_hub_dir(name_or_path: str | Path, patterns: list[str], what: str) -> Path:
    """A local directory for ``what`` (e.g. 'adapter'), downloading only ``patterns`` for a hub id."""
    path = _local_or_hub_id(name_or_path, f"{what} directory")
    return path if isinstance(path, Path) else download(path, patterns, what=what)


def _local_or_hub_id(name_or_path: str | Path, what: str, file_hint: str | None = None) -> Path | str:
    """An existing directory as a Path, a hub id as a str; anything else is a CheckpointError."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{text} is a file; {file_hint or f'pass the {what}'}")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not is_hub_id(text):
        raise CheckpointError(f"{what} {text} does not exist")
    return text


def download(repo_id: str, patterns: list[str], what: str = "model") -> Path:
    """``snapshot_download`` of the files matching ``patterns``; any failure is a CheckpointError."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CheckpointError("huggingface_hub is needed to download from the hub; pip install huggingface_hub"
                              ) from exc
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all mean "could not get it"
        raise CheckpointError(
            f"could not fetch {what} {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Check the id and your connection, or pass a local {what} directory") from None
