"""``loratune compare RECIPE``: the tutorial's LoRA-vs-full comparison, reproducible."""

from __future__ import annotations

import argparse
import json

from ..train.compare import check_steps, compare, format_table
from .train import add_recipe_args, recipe_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="run a recipe as LoRA and as full fine-tuning for a few steps and compare")
    add_recipe_args(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode, at least 1, after one warm-up step "
                   "(default 5)")
    p.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_steps(args.steps)  # before the recipe is read: the flag alone is wrong
    recipe = recipe_from_args(args)
    rows = compare(recipe, steps=args.steps)
    print(f"{recipe.model} | batch {recipe.batch_size} x seq {recipe.seq_len} | {rows[0]['precision']} | "
          f"LoRA r={recipe.lora.r} on {','.join(recipe.lora.targets)} | {args.steps} timed steps")
    print(format_table(rows, args.steps))
    if args.json:
        print(json.dumps(rows))
    return 0
