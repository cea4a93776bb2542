"""``loratune eval``: loss and perplexity of a model (with an optional adapter) on a data file."""

from __future__ import annotations

import argparse
import contextlib
import json
import math

import torch

from ..data import Batches, DataConfig, build_examples, load_records
from ..errors import NonFiniteOutput
from ..generate.sampling import NON_FINITE_ADVICE
from ..train import evaluate
from ..train.metrics import perplexity
from .common import add_model_args, load_for_inference, log, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity on a data file")
    add_model_args(p)
    p.add_argument("--adapter", help="LoRA adapter directory to apply")
    p.add_argument("--data", required=True, help="data file (.jsonl/.json/.csv/.parquet/.txt) or hub id")
    p.add_argument("--task", default="causal_lm", choices=["causal_lm", "completion"])
    p.add_argument("--text-field", default="documents")
    p.add_argument("--prompt-template", default=DataConfig.prompt_template)
    p.add_argument("--completion-template", default=DataConfig.completion_template)
    p.add_argument("--seq-len", type=positive_int, default=128,
                   help="tokens per sequence (capped, with a notice, at the model's context)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-examples", type=positive_int, default=None, help="only the first N records")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (perplexity null where it overflows, loss >= 50)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer, device, _ = load_for_inference(args)
    cfg = DataConfig(source=args.data, task=args.task, text_field=args.text_field,
                     prompt_template=args.prompt_template, completion_template=args.completion_template,
                     val_fraction=0.0, shuffle=False)
    records = load_records(args.data, cfg)
    if args.max_examples is not None:
        records = records[:args.max_examples]
    examples = build_examples(records, cfg, tokenizer, _seq_len(args.seq_len, model.config.context_length))
    batches = Batches(examples, args.batch_size, shuffle=False, pad_id=tokenizer.pad_id, drop_last=False)
    with torch.inference_mode():
        loss = evaluate(model, batches, device, contextlib.nullcontext())
    if not math.isfinite(loss):
        raise NonFiniteOutput(f"the loss on {args.data} is {loss}: {NON_FINITE_ADVICE}")
    ppl = perplexity(loss)
    result = {"loss": round(loss, 6), "perplexity": round(ppl, 4) if math.isfinite(ppl) else None,
              "examples": len(examples), "tokens": sum(sum(1 for t in e.labels if t != -100) for e in examples)}
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(f"loss {result['loss']:.4f} | perplexity {ppl:.2f} | "
              f"{result['examples']} examples, {result['tokens']} target tokens")
    return 0


def _seq_len(asked: int, context: int) -> int:
    """``--seq-len``, capped at the model's context, saying so (a silent cap would change what is measured)."""
    if asked > context:
        log.warning(f"--seq-len {asked} capped to {context}, the model's context")
    return min(asked, context)
