"""``loratune merge``: fold an adapter into the base weights and write a Hugging Face model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapters.peft_format import load_adapter
from ..errors import ConfigError
from ..hub.export import save_hf_model
from ..adapters.lora import merge_lora
from ..models import load_model
from .common import DTYPES, add_model_args, device_and_dtype, log


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into the model and save a Hugging Face directory",
                       description="W <- W + scale * B A (float32), then save config.json, safetensors "
                                   "(sharded past --max-shard-size), tokenizer and generation config.")
    add_model_args(p)
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format) or hub id")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--out-dtype", default=None, choices=sorted(DTYPES), help="dtype of the saved weights "
                   "(default: the model's)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device, dtype = device_and_dtype(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out")
    model, model_dir = load_model(args.model, dtype=dtype, device=device)
    load_adapter(model, args.adapter, base_model=args.model)
    merged = merge_lora(model)
    out_dtype = DTYPES[args.out_dtype] if args.out_dtype else None
    save_hf_model(model, out, tokenizer_dir=model_dir, dtype=out_dtype, max_shard_size=args.max_shard_size)
    log.info(f"merged {merged} LoRA layers into {args.model}")
    print(f"wrote {out}")
    return 0
