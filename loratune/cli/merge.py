"""``loratune merge``: fold an adapter into the base weights and write a Hugging Face model."""

from __future__ import annotations

import argparse

from ..adapters.combine import COMBINATIONS
from ..adapters.peft_format import resolve_adapter_dir
from ..errors import ConfigError
from ..hub.export import config_dtype
from ..hub.files import read_config
from ..runtime.outdir import prepare_output_dir, refuse_inputs_inside
from ..merge import MergePlan, merge_record, merged_model, refuse_repeat, refuse_twice, save_merged
from ..models import resolve_model
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
    p.add_argument("--adapter", required=True, action="append", help="adapter directory (PEFT format), hub id or LoRA adapter GGUF; "
                   "repeat it to merge several")
    p.add_argument("--weights", default=None, help="comma-separated weight per adapter (default: 1 each)")
    p.add_argument("--combine", default="cat", choices=COMBINATIONS, help="how several adapters combine (default "
                   "cat: exactly the weighted sum of their updates; svd, ties, dare_* ... approximate it at a "
                   "rank, see docs/adapters.md)")
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


def run(args: argparse.Namespace) -> int:
    device, dtype = device_and_dtype(args)
    out = prepare_output_dir(args.out, create=False, remedy="choose a new --out")  # new or empty: so no input there
    refuse_inputs_inside(out, [("the model", args.model), *(("the adapter", a) for a in args.adapter)])  # nor is one
    model_dir = resolve_model(args.model)
    base_config = read_config(model_dir)
    adapter_dirs = [resolve_adapter_dir(a) for a in args.adapter]
    weights = _weights(args.weights, len(adapter_dirs))
    records = [merge_record(a, d, args.model) for a, d in zip(args.adapter, adapter_dirs)]
    if not args.allow_repeat:
        refuse_twice(records)
        for record in records:
            refuse_repeat(base_config, record, args.model)
    plan = MergePlan(adapter_dirs, weights, args.combine, dict(density=args.density, svd_rank=args.svd_rank,
                     majority_sign_method=args.majority_sign), args.seed, args.model)
    out_dtype = DTYPES[args.out_dtype] if args.out_dtype else config_dtype(base_config)
    model, merged = merged_model(plan, model_dir, args.into, device, dtype, out_dtype)
    save_merged(model, out, model_dir, base_config, records, out_dtype, args.max_shard_size)
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
