"""``loratune info``: the architecture and what LoRA would train."""

from __future__ import annotations

import argparse

from ..adapters.lora import LoRAConfig
from ..models import load_model
from ..adapters.trainable import parameter_report, set_trainable
from ..adapters.targets import inject_lora
from ..quant.model import QuantConfig, base_bits, quantize_model, quantized_layers
from .common import add_model_args, device_and_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show a model's architecture and LoRA parameter counts")
    add_model_args(p)
    p.add_argument("--lora-targets", default=None, help="comma-separated targets, e.g. q,v (default: no LoRA)")
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "int8", "gguf"], help="store the base as "
                   "QLoRA does (nf4), in int8, or in a GGUF's own blocks (gguf) and report its bits per parameter")
    p.add_argument("--no-double-quant", action="store_true", help="nf4 without quantizing the block scales again")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device, dtype = device_and_dtype(args)
    model, model_dir = load_model(args.model, dtype=dtype, device=device)
    print(f"model: {args.model} ({model_dir})")
    print(f"architecture: {model.family.display_name}, {model.family.describe(model.config)}")
    if args.lora_targets:
        lora = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets, rslora=args.rslora)
        names = inject_lora(model, lora)
        set_trainable(model, "lora")
        print(f"lora: r={lora.r}, alpha={lora.alpha:g}, scale={lora.scale:g}, targets={','.join(lora.targets)}, "
              f"{len(names)} layers adapted")
    else:
        set_trainable(model, "full")
        print("lora: none (full fine-tuning would train every parameter)")
    print(parameter_report(model))
    if args.quantize != "none":
        quantize_model(model, QuantConfig(args.quantize, double_quant=not args.no_double_quant), model_dir)
        layers, whole = base_bits(model)
        print(f"base: {args.quantize}, {layers:.3f} bits per parameter in the {len(quantized_layers(model))} "
              f"quantized projections, {whole:.3f} over the whole base (embeddings, norms and the head keep "
              f"{args.dtype})")
    return 0
