"""``loratune merge``: fold an adapter into the base weights and write a Hugging Face model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..adapters.lora import merge_lora
from ..adapters.peft_format import (
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_adapter,
    resolve_adapter_dir,
)
from ..errors import CheckpointError, MergeError
from ..hub.export import (
    checkpoint_dtype,
    merged_adapters,
    save_hf_model,
    with_merged_adapter,
)
from ..hub.files import read_config, sha256_file
from ..hub.outdir import prepare_output_dir
from ..hub.resolve import resolve_model_dir
from ..models import load_model
from .common import DTYPES, add_model_args, device_and_dtype, log


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into the model and save a Hugging Face directory",
                       description="W <- W + scale * B A (float32), then save config.json (the base model's, "
                                   "recording the merged adapter under 'loratune'), safetensors (sharded past "
                                   "--max-shard-size), tokenizer and generation config.")
    add_model_args(p)
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format) or hub id")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--out-dtype", default=None, choices=sorted(DTYPES), help="dtype of the saved weights "
                   "(default: the base model's, as its config.json states it; else --dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--allow-repeat", action="store_true", help="merge even if the model's config.json records "
                   "that this adapter is already merged into it (its update is then applied twice)")
    p.set_defaults(run=run)


def merge_record(adapter: str, adapter_dir: Path, base_model: str) -> dict[str, Any]:
    """What config.json records about one merge: the adapter as given, its weights' sha256, the base model.

    The sha256 identifies the adapter wherever it was copied to or renamed.
    """
    weights = next((adapter_dir / n for n in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) if (adapter_dir / n).is_file()),
                   None)
    if weights is None:
        raise CheckpointError(f"adapter weights not found in {adapter_dir}: expected {WEIGHTS_NAME}")
    local = Path(adapter).expanduser()
    path = str(local.resolve()) if local.is_dir() else adapter
    return {"path": path, "sha256": sha256_file(weights), "base_model": str(base_model)}


def refuse_repeat(base_config: dict[str, Any], record: dict[str, Any], model: str) -> None:
    """MergeError if the base model's config.json lists these adapter weights as merged already."""
    earlier = next((e for e in merged_adapters(base_config) if e.get("sha256") == record["sha256"]), None)
    if earlier is not None:
        raise MergeError(f"adapter {record['path']} is already merged into {model} (config.json lists its "
                         f"weights, sha256 {record['sha256'][:12]}..., as merged from {earlier.get('path')}); "
                         "merging it again applies it twice: pass --allow-repeat to do that anyway")


def run(args: argparse.Namespace) -> int:
    device, dtype = device_and_dtype(args)
    out = prepare_output_dir(args.out, create=False, remedy="choose a new --out")
    model_dir = resolve_model_dir(args.model)
    base_config = read_config(model_dir)
    adapter_dir = resolve_adapter_dir(args.adapter)
    record = merge_record(args.adapter, adapter_dir, args.model)
    if not args.allow_repeat:
        refuse_repeat(base_config, record, args.model)
    model, model_dir = load_model(model_dir, dtype=dtype, device=device)
    load_adapter(model, adapter_dir, base_model=args.model)
    merged = merge_lora(model)
    out_dtype = DTYPES[args.out_dtype] if args.out_dtype else checkpoint_dtype(base_config)
    save_hf_model(model, out, tokenizer_dir=model_dir, dtype=out_dtype, max_shard_size=args.max_shard_size,
                  base_config=with_merged_adapter(base_config, record), base_dir=model_dir)
    log.info(f"merged {merged} LoRA layers into {args.model}")
    print(f"wrote {out}")
    return 0
