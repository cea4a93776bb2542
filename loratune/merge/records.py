"""What a merged model records about its adapters, and the repeats that record lets ``loratune merge`` refuse.

config.json's ``loratune.merged_adapters`` lists every adapter folded into the weights (the path as
given, the sha256 of its weights, the base model), so merging the same weights twice, into the same
model or twice in one command, is caught by content, whatever the copy or name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapters.peft_format import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from ..errors import CheckpointError, MergeError
from ..hub.export import merged_adapters
from ..hub.files import sha256_file


def merge_record(adapter: str, adapter_dir: Path, base_model: str) -> dict[str, Any]:
    """What config.json records about one merge: the adapter as given, its weights' sha256, the base model.

    The sha256 identifies the adapter wherever it was copied to or renamed.
    """
    weights = adapter_dir if adapter_dir.is_file() else next(  # a file: a LoRA adapter GGUF
        (adapter_dir / n for n in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) if (adapter_dir / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"adapter weights not found in {adapter_dir}: expected {WEIGHTS_NAME}")
    local = Path(adapter).expanduser()
    path = str(local.resolve()) if local.exists() else adapter
    return {"path": path, "sha256": sha256_file(weights), "base_model": str(base_model)}


def refuse_repeat(base_config: dict[str, Any], record: dict[str, Any], model: str) -> None:
    """MergeError if the base model's config.json lists these adapter weights as merged already."""
    earlier = next((e for e in merged_adapters(base_config) if e.get("sha256") == record["sha256"]), None)
    if earlier is not None:
        raise MergeError(f"adapter {record['path']} is already merged into {model} (config.json lists its "
                         f"weights, sha256 {record['sha256'][:12]}..., as merged from {earlier.get('path')}); "
                         "merging it again applies it twice: pass --allow-repeat to do that anyway")


def refuse_twice(records: list[dict[str, Any]]) -> None:
    """MergeError if two --adapter name the same adapter weights (by sha256: copies and renames too)."""
    first: dict[str, str] = {}
    for record in records:
        if record["sha256"] in first:
            raise MergeError(f"adapter {record['path']} is given twice (its weights, sha256 "
                             f"{record['sha256'][:12]}..., are those of {first[record['sha256']]}): merging it twice "
                             "applies its update twice; give it once (--weights 2 doubles its update), or pass "
                             "--allow-repeat to do that anyway")
        first[record["sha256"]] = record["path"]
