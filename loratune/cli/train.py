"""``loratune train RECIPE``: run a training recipe, resumable."""

from __future__ import annotations

import argparse
import sys

from ..dist.world import join_world, leave_world
from ..errors import ConfigError
from ..runtime.fsutil import full_disk_is_a_resource_error
from ..recipe import load_recipe
from ..train.metrics import human_bytes
from ..train import train


_FULL_DISK_ADVICE = ("every checkpoint on disk is complete. Free some space (or lower keep_checkpoints), then continue "
                     "with --resume, or start over with --overwrite if no checkpoint was saved yet")
"""For a write outside the checkpoint and result writers, which give their own advice (train/guards.py)."""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune from a recipe (YAML)",
                       description="Fine-tune a model as a recipe says; every recipe key can be overridden.")
    add_recipe_args(p)
    p.add_argument("--out", help="output directory (recipe key out_dir)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (recipe key max_steps)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds an earlier one: what loratune wrote there (its "
                        ".loratune-manifest.json) is removed once the new run is set up; your own files are kept")
    p.add_argument("--force-resume", action="store_true",
                   help="with --resume: continue even though result-changing recipe fields differ from the checkpoint's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/gpt2_reddit_tifu.yaml")
    p.add_argument("--model", help="replace the recipe's model (checkpoint directory or hub id)")
    p.add_argument("--data", help="replace the recipe's data source (file or hub id); field names are kept")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set lora.r=8 --set lr=1e-4 (repeatable)")


def recipe_from_args(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.data:
        overrides.append(f"data.source={args.data}")
    if getattr(args, "out", None):
        overrides.append(f"out_dir={args.out}")
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"max_steps={args.max_steps}")
    return load_recipe(args.recipe, overrides)


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    if args.overwrite and (args.resume or args.force_resume):
        raise ConfigError("--overwrite starts over and --resume continues: pass one of them")
    world = join_world(recipe.device)  # one process, or this rank of a torchrun launch
    try:
        with full_disk_is_a_resource_error(f"the run's outputs in {recipe.out_dir}", _FULL_DISK_ADVICE):
            result = train(recipe, resume=args.resume or args.force_resume, force_resume=args.force_resume,
                           overwrite=args.overwrite, progress=not args.no_progress and sys.stderr.isatty(),
                           world=world, recipe_file=args.recipe)
    finally:
        leave_world(world)
    if not world.main:
        return 0 if result.status == "done" else 130
    print(f"{result.status}: {result.steps} steps, {result.seconds:.1f} s, peak memory {human_bytes(result.peak_memory)}"
          f", train loss {_fmt(result.train_loss)}, validation loss {_fmt(result.val_loss)} -> {result.out_dir}")
    return 0 if result.status == "done" else 130


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
