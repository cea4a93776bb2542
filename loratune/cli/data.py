"""``loratune data RECIPE``: the first examples exactly as the model will see them, trained tokens marked.

Only the tokenizer is read (no weights). The records are those training uses (with ``max_examples``,
the same seeded subset), before the validation split. Text mode prints each example's rendered text with the
trained tokens highlighted (colour on a terminal, ``[[...]]`` otherwise), its token counts and what
truncation did; then a summary of the whole data set. ``--json`` prints one object a line,
``{"input_ids": [...], "labels": [...]}``, labels aligned with input_ids as in transformers: the
arrays the training loop batches (it reads ``input_ids[:-1]`` and predicts ``labels[1:]``).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..data.examples import IGNORE_INDEX, Encoded
from ..data.tasks import drop_reasons
from ..errors import DataError
from ..hub.files import TOKENIZER_FILES
from .train import add_recipe_args, recipe_from_args

TOKENIZER_DOWNLOAD = ["config.json", *TOKENIZER_FILES]
COLOUR, PLAIN = ("\033[1;32m", "\033[0m"), ("[[", "]]")


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="show training examples as the model sees them",
                       description="Show the first examples of a recipe's data as the model will see them: the "
                                   "text with the trained tokens marked, token counts, cuts and drops.")
    add_recipe_args(p)
    p.add_argument("--limit", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--json", action="store_true",
                   help='one {"input_ids": [...], "labels": [...]} object a line (labels aligned, -100 untrained)')
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the trained tokens (auto: on a terminal)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data import encode_records, load_records, load_tokenizer
    from ..data.prepare import subset
    from ..hub.gguf_file import is_gguf_path
    from ..hub.resolve import resolve_hub_dir
    from ..models import resolve_model

    if args.limit < 0:
        raise DataError(f"--limit must be >= 0, got {args.limit}")
    recipe = recipe_from_args(args)
    cfg = recipe.data
    tokenizer = load_tokenizer(resolve_model(recipe.model) if is_gguf_path(recipe.model)
                               else resolve_hub_dir(recipe.model, TOKENIZER_DOWNLOAD, "tokenizer"))
    tokenizer.source = recipe.model
    records = subset(load_records(cfg.source, cfg), cfg, recipe.seed)  # what training uses (max_examples)
    encoded = encode_records(records, cfg, tokenizer, recipe.seq_len, cfg.source)
    shown = encoded[:args.limit]
    if args.json:
        for e in shown:
            if e.example is not None:
                sys.stdout.write(json.dumps({"input_ids": e.example.input_ids, "labels": e.example.labels}) + "\n")
    else:
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        for i, e in enumerate(shown):
            sys.stdout.write(_describe(i, e, tokenizer, COLOUR if colour else PLAIN) + "\n")
    print(_summary(encoded, cfg, recipe.seq_len), file=sys.stderr if args.json else sys.stdout)
    return 0


def _describe(i: int, e: Encoded, tokenizer, marks: tuple[str, str]) -> str:
    head = f"--- example {i + 1}"
    if e.example is None:
        return f"{head}: dropped ({e.dropped}){'; ' + e.cut if e.cut else ''}\n"
    ids, labels = e.example.input_ids, e.example.labels
    lines = [f"{head}: {len(ids)} tokens, {e.example.trained} trained" + (f"; {e.cut}" if e.cut else "")]
    runs, start = [], 0
    for t in range(1, len(ids) + 1):  # runs of tokens that are all trained or all not
        if t == len(ids) or (labels[t] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:t])
            runs.append(f"{marks[0]}{text}{marks[1]}" if labels[start] != IGNORE_INDEX else text)
            start = t
    lines.append("".join(runs))
    return "\n".join(lines) + "\n"


def _summary(encoded: list[Encoded], cfg, seq_len: int) -> str:
    kept = [e.example for e in encoded if e.example is not None]
    tokens, trained = sum(len(x.input_ids) for x in kept), sum(x.trained for x in kept)
    cut = sum(e.cut is not None for e in encoded)
    dropped = ", ".join(f"{n} {why}" for why, n in drop_reasons(encoded).items()) or "none"
    share = f" ({100 * trained / tokens:.1f}%)" if tokens else ""
    packing = "; packed several to a row" if cfg.packing else ""
    return (f"{len(encoded)} examples from {cfg.source} (task {cfg.task}, seq_len {seq_len}{packing}): "
            f"{tokens} tokens, {trained} trained{share}; {cut} cut to fit; dropped: {dropped}")
