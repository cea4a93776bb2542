"""``loratune data RECIPE``: the first examples exactly as the model will see them, trained tokens marked.

Only the tokenizer is read (no weights). The records are those training uses (with ``max_examples``,
the same seeded subset), before the validation split. The recipe's ``objective`` decides what they are:
the data task's examples (sft), preference pairs (dpo, ipo, orpo, simpo), KTO's labelled completions,
or GRPO's prompts. Text mode prints each example's rendered text with the trained tokens highlighted
(colour on a terminal, ``[[...]]`` otherwise; a pair's chosen and rejected sequences each, a KTO
example with its label, a GRPO prompt as the model reads it), its token counts and what truncation
did; then a summary of the whole data set. ``--json`` prints one object a line: for sft
``{"input_ids": [...], "labels": [...]}``, labels aligned with input_ids as in transformers (the arrays
the training loop batches: it reads ``input_ids[:-1]`` and predicts ``labels[1:]``); for pairs TRL's
``{"prompt_ids", "chosen_ids", "rejected_ids"}``, for KTO ``{"prompt_ids", "completion_ids", "label"}``,
for GRPO ``{"prompt_ids"}`` (before the cut to seq_len + 1, which the batches make).
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
                   help='one object a line: {"input_ids": [...], "labels": [...]} (labels aligned, -100 untrained); '
                        'with a preference objective TRL\'s {"prompt_ids", "chosen_ids", "rejected_ids"}, for kto '
                        '{"prompt_ids", "completion_ids", "label"}, for grpo {"prompt_ids"}')
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the trained tokens (auto: on a terminal)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data import encode_records, load_records, load_tokenizer
    from ..data.prepare import subset
    from ..hub.gguf_file import is_gguf_path
    from ..hub.resolve import resolve_hub_dir
    from ..models import resolve_model
    from ..train.objective import make_objective

    if args.limit < 0:
        raise DataError(f"--limit must be >= 0, got {args.limit}")
    recipe = recipe_from_args(args)
    cfg = recipe.data
    tokenizer = load_tokenizer(resolve_model(recipe.model) if is_gguf_path(recipe.model)
                               else resolve_hub_dir(recipe.model, TOKENIZER_DOWNLOAD, "tokenizer"))
    tokenizer.source = recipe.model
    records = subset(load_records(cfg.source, cfg), cfg, recipe.seed)  # what training uses (max_examples)
    kind = make_objective(recipe.objective, recipe).data
    if kind != "sft":
        return _show_items(args, recipe, tokenizer, records, kind)
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
    counts = f"{len(e.example.input_ids)} tokens, {e.example.trained} trained" + (f"; {e.cut}" if e.cut else "")
    return f"{head}: {counts}\n{_marked(e.example, tokenizer, marks)}\n"


def _marked(example, tokenizer, marks: tuple[str, str]) -> str:
    """The example's text, runs of trained tokens between ``marks``."""
    ids, labels = example.input_ids, example.labels
    runs, start = [], 0
    for t in range(1, len(ids) + 1):  # runs of tokens that are all trained or all not
        if t == len(ids) or (labels[t] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:t])
            runs.append(f"{marks[0]}{text}{marks[1]}" if labels[start] != IGNORE_INDEX else text)
            start = t
    return "".join(runs)


def _show_items(args: argparse.Namespace, recipe, tokenizer, records: list[dict], kind: str) -> int:
    """The preference, KTO or GRPO view (see the module docstring)."""
    from ..data.preference_items import encode_items

    cfg = recipe.data
    items = encode_items(records, kind, cfg, tokenizer, recipe.seq_len, cfg.source,
                         prompt_field=recipe.grpo.prompt_field)
    shown = items[:args.limit]
    if args.json:
        for item in shown:
            if item.fits:
                sys.stdout.write(json.dumps(_trl_ids(item)) + "\n")
    else:
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        for i, item in enumerate(shown):
            sys.stdout.write(_describe_item(i, item, tokenizer, COLOUR if colour else PLAIN) + "\n")
    kept = [item for item in items if item.fits]
    what = {"pairs": "pairs", "unpaired": "KTO examples", "prompts": "prompts"}[kind]
    dropped = len(items) - len(kept)
    cut = sum(_cut(item) is not None for item in kept)
    print(f"{len(items)} {what} from {cfg.source} (objective {recipe.objective}, seq_len {recipe.seq_len}, "
          f"truncation {cfg.truncation}): {cut} cut to fit; dropped: "
          + (f"{dropped} with a prompt of seq_len + 1 tokens or more" if dropped else "none"),
          file=sys.stderr if args.json else sys.stdout)
    return 0


def _trl_ids(item) -> dict:
    if item.kind == "pairs":
        return {"prompt_ids": item.prompt_ids, "chosen_ids": item.chosen_ids, "rejected_ids": item.rejected_ids}
    if item.kind == "unpaired":
        return {"prompt_ids": item.prompt_ids, "completion_ids": item.completion_ids, "label": item.desirable}
    return {"prompt_ids": item.prompt_ids}


def _cut(item) -> str | None:
    """What truncation does to the item, or None."""
    if item.kind == "prompts":
        return f"its first {item.cut} tokens cut (keep_end)" if item.cut else None
    answers = [item.chosen_ids, item.rejected_ids] if item.kind == "pairs" else [item.completion_ids]
    longest = len(item.prompt_ids) + max(len(a) for a in answers)
    return f"cut to {item.limit} of {longest} tokens ({item.truncation})" if longest > item.limit else None


def _describe_item(i: int, item, tokenizer, marks: tuple[str, str]) -> str:
    noun = {"pairs": "pair", "unpaired": "example", "prompts": "prompt"}[item.kind]
    where = item.where.rsplit(", ", 1)[-1]
    head = f"--- {noun} {i + 1} ({where})"
    if not item.fits:
        return (f"{head}: dropped (the prompt alone has {len(item.prompt_ids)} tokens, and seq_len + 1 is "
                f"{item.limit}; data.truncation keep_start)\n")
    cut = _cut(item)
    tail = f"; {cut}" if cut else ""
    if item.kind == "prompts":
        return f"{head}: {len(item.prompt_ids)} tokens{tail}\n{tokenizer.decode(item.prompt_ids)}\n"
    if item.kind == "unpaired":
        row = item.row()
        label = "desirable (label true)" if item.desirable else "undesirable (label false)"
        return (f"{head}: {label}; {len(row.input_ids)} tokens, {row.trained} trained{tail}\n"
                f"{_marked(row, tokenizer, marks)}\n")
    chosen, rejected = item.rows()
    return (f"{head}: prompt {len(item.prompt_ids)} tokens; chosen {len(chosen.input_ids)} tokens, {chosen.trained} "
            f"trained; rejected {len(rejected.input_ids)} tokens, {rejected.trained} trained{tail}\n"
            f"chosen:\n{_marked(chosen, tokenizer, marks)}\nrejected:\n{_marked(rejected, tokenizer, marks)}\n")


def _summary(encoded: list[Encoded], cfg, seq_len: int) -> str:
    kept = [e.example for e in encoded if e.example is not None]
    tokens, trained = sum(len(x.input_ids) for x in kept), sum(x.trained for x in kept)
    cut = sum(e.cut is not None for e in encoded)
    dropped = ", ".join(f"{n} {why}" for why, n in drop_reasons(encoded).items()) or "none"
    share = f" ({100 * trained / tokens:.1f}%)" if tokens else ""
    packing = "; packed several to a row" if cfg.packing else ""
    return (f"{len(encoded)} examples from {cfg.source} (task {cfg.task}, seq_len {seq_len}{packing}): "
            f"{tokens} tokens, {trained} trained{share}; {cut} cut to fit; dropped: {dropped}")
