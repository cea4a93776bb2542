"""``loratune eval``: loss and perplexity of a model (with an optional adapter) on a data file."""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from ..adapters.peft_format import load_adapter
from ..data import Batches, DataConfig, build_examples, load_records
from ..models import load_model
from ..train.metrics import perplexity
from ..data.tokenizer import load_tokenizer
from ..train import evaluate
from .common import add_model_args, device_and_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity on a data file")
    add_model_args(p)
    p.add_argument("--adapter", help="LoRA adapter directory to apply")
    p.add_argument("--data", required=True, help="data file (.jsonl/.json/.csv/.parquet/.txt) or hub id")
    p.add_argument("--task", default="causal_lm", choices=["causal_lm", "completion"])
    p.add_argument("--text-field", default="documents")
    p.add_argument("--prompt-template", default=DataConfig.prompt_template)
    p.add_argument("--completion-template", default=DataConfig.completion_template)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device, dtype = device_and_dtype(args)
    model, model_dir = load_model(args.model, dtype=dtype, device=device)
    if args.adapter:
        load_adapter(model, args.adapter, base_model=args.model)  # on the model's device
    tokenizer = load_tokenizer(model_dir)
    cfg = DataConfig(source=args.data, task=args.task, text_field=args.text_field,
                     prompt_template=args.prompt_template, completion_template=args.completion_template,
                     val_fraction=0.0, shuffle=False)
    records = load_records(args.data, cfg)
    if args.max_examples:
        records = records[:args.max_examples]
    examples = build_examples(records, cfg, tokenizer, min(args.seq_len, model.config.context_length))
    batches = Batches(examples, args.batch_size, shuffle=False, pad_id=tokenizer.pad_id, drop_last=False)
    with torch.inference_mode():
        loss = evaluate(model, batches, device, contextlib.nullcontext())
    result = {"loss": round(loss, 6), "perplexity": round(perplexity(loss), 4), "examples": len(examples),
              "tokens": sum(sum(1 for t in e.labels if t != -100) for e in examples)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
              f"{result['examples']} examples, {result['tokens']} target tokens")
    return 0
