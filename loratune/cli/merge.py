"""``loratune merge``: fold an adapter into the base weights and write a Hugging Face model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..adapters.combine import COMBINATIONS
from ..adapters.peft_format import (
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    resolve_adapter_dir,
)
from ..errors import CheckpointError, ConfigError, MergeError
from ..hub.export import (
    checkpoint_dtype,
    merged_adapters,
    save_hf_model,
    with_merged_adapter,
)
from ..hub.files import read_config, sha256_file
from ..hub.fsutil import full_disk_is_a_resource_error
from ..hub.outdir import prepare_output_dir, refuse_inputs_inside
from ..hub.resolve import resolve_model_dir
from ..models import load_model
from ..quant.merge import MergePlan, merge_qlora, trained_quantization
from .common import DTYPES, add_model_args, device_and_dtype, log


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge LoRA adapters into the model and save a Hugging Face directory",
                       description="W <- W + scale * B A (float32), then save config.json (the base model's, "
                                   "recording the merged adapters under 'loratune'), safetensors (sharded past "
                                   "--max-shard-size), tokenizer and generation config. Several adapters are "
                                   "combined first (--weights, --combine), as PEFT's add_weighted_adapter does. "
                                   "A QLoRA adapter is merged into the dequantized 4-bit base it was trained "
                                   "against, in float32 (--into).")
    add_model_args(p)
    p.add_argument("--adapter", required=True, action="append", help="adapter directory (PEFT format) or hub id; "
                   "repeat it to merge several")
    p.add_argument("--weights", default=None, help="comma-separated weight per adapter (default: 1 each)")
    p.add_argument("--combine", default="cat", choices=COMBINATIONS, help="how several adapters combine (default "
                   "cat: exactly the weighted sum of their updates; svd, ties, dare_* ... approximate it at a "
                   "rank, see the README)")
    p.add_argument("--density", type=float, default=None, help="fraction of entries kept by ties/dare/"
                   "magnitude_prune")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of the *svd combinations (default: the largest)")
    p.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="TIES' sign election")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default 0)")
    p.add_argument("--into", default="auto", choices=["auto", "quantized", "original"], help="for QLoRA adapters: "
                   "merge into the dequantized 4-bit base they were trained against (auto, quantized) or into the "
                   "original 16/32-bit weights (original: warned, the adapter was not trained for them)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--out-dtype", default=None, choices=sorted(DTYPES), help="dtype of the saved weights "
                   "(default: the base model's, as its config.json states it; else --dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--allow-repeat", action="store_true", help="merge even if the model's config.json records "
                   "that an adapter is already merged into it, or the same adapter is given twice (its update is "
                   "then applied twice)")
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


def run(args: argparse.Namespace) -> int:
    device, dtype = device_and_dtype(args)
    out = prepare_output_dir(args.out, create=False, remedy="choose a new --out")  # new or empty: so no input there
    refuse_inputs_inside(out, [("the model", args.model), *(("the adapter", a) for a in args.adapter)])  # nor is one
    model_dir = resolve_model_dir(args.model)
    base_config = read_config(model_dir)
    adapter_dirs = [resolve_adapter_dir(a) for a in args.adapter]
    weights = _weights(args.weights, len(adapter_dirs))
    records = [merge_record(a, d, args.model) for a, d in zip(args.adapter, adapter_dirs)]
    if not args.allow_repeat:
        refuse_twice(records)
        for record in records:
            refuse_repeat(base_config, record, args.model)
    quant = trained_quantization(adapter_dirs)
    into = "original" if quant is None else ("quantized" if args.into == "auto" else args.into)
    plan = MergePlan(adapter_dirs, weights, args.combine, dict(density=args.density, svd_rank=args.svd_rank,
                     majority_sign_method=args.majority_sign), args.seed, args.model)
    out_dtype = DTYPES[args.out_dtype] if args.out_dtype else checkpoint_dtype(base_config)
    if quant is None:
        model, _ = load_model(model_dir, dtype=dtype, device=device)
        merged = plan.apply(model)
    else:
        model, merged = merge_qlora(plan, model_dir, quant, into, device, out_dtype)
    config = base_config
    for record in records:
        config = with_merged_adapter(config, record)
    with full_disk_is_a_resource_error(f"the merged model to {out}", "the unfinished write was removed. Free some "
                                       "space, or choose an --out on another disk, and run the command again"):
        save_hf_model(model, out, tokenizer_dir=model_dir, dtype=out_dtype, max_shard_size=args.max_shard_size,
                      base_config=config, base_dir=model_dir)
    log.info(f"merged {len(adapter_dirs)} adapter(s) into {merged} layers of {args.model}")
    print(f"wrote {out}")
    return 0


def _weights(text: str | None, n: int) -> list[float]:
    if text is None:
        return [1.0] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: give comma-separated numbers, one per --adapter") from None
    if len(weights) != n:
        raise ConfigError(f"--weights has {len(weights)} values for {n} adapters: give one per --adapter")
    return weights
