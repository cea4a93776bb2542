"""``loratune generate``: continue a prompt with a base model, optionally with an adapter."""

from __future__ import annotations

import argparse
import sys

import torch

from ..adapters.lora import merge_lora
from ..generate import SamplingConfig, generate
from .common import add_model_args, load_for_inference, log


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Continue PROMPT; only the continuation goes to stdout.")
    add_model_args(p)
    p.add_argument("--adapter", help="LoRA adapter directory to apply")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights first (faster)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model, tokenizer, device, lora = load_for_inference(args)
    if lora is not None:
        log.info(f"adapter: {args.adapter} (r={lora.r}, alpha={lora.alpha:g}, targets={','.join(lora.targets)})")
        if args.merge:
            merge_lora(model)
    # the prompt starts with BOS where the tokenizer has one, as in training and transformers' tokenizer(text)
    ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(args.prompt)
    if not ids:
        ids = [tokenizer.eos_id]
    prompt = torch.tensor([ids], device=device)
    new = generate(model, prompt, sampling, eos_ids=tokenizer.eos_ids)[0].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in tokenizer.eos_ids), len(new))]  # cut at the first eos
    sys.stdout.write(tokenizer.decode(new) + "\n")
    return 0
