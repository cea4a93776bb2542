"""``loratune eval``: loss and perplexity of a model (with an optional adapter) on a data file; with
``--generate``, each held-out prompt's greedy completion scored against its reference (ROUGE-L, exact
match, length), the base and the adapter side by side, and a report (``--report DIR``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..data import Batches, DataConfig, build_examples, load_records
from ..data.config import CHAT_FORMATS
from ..errors import ConfigError, NonFiniteOutput
from ..generate.sampling import NON_FINITE_ADVICE
from ..train import evaluate
from ..train.metrics import perplexity
from .common import add_model_args, load_for_inference, log, positive_int, template_variables

DEFAULT_SEQ_LEN = 128
"""--seq-len of the loss (generation defaults to the model's context)."""
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 64
REPORT_OUTPUTS = ("generations.jsonl", "report.json", "report.md", "rouge_l.png")
"""What ``--report`` writes in its directory (listed in its manifest; ``--overwrite`` replaces only these)."""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity on a data file; with --generate, ROUGE-L, "
                                    "exact match and length of greedy completions",
                       description="Loss and perplexity on a data file. With --generate: each record's prompt is "
                                   "completed greedily and scored against its reference (task completion: the "
                                   "completion template; task chat: the last assistant turn), with --adapter "
                                   "beside the base (the same model with the adapter disabled).")
    add_model_args(p)
    p.add_argument("--adapter", help="LoRA adapter to apply: a PEFT directory, a hub id, or a LoRA adapter GGUF")
    p.add_argument("--data", required=True, help="data file (.jsonl/.json/.csv/.parquet/.txt) or hub id")
    p.add_argument("--task", default="causal_lm", choices=["causal_lm", "completion", "chat"])
    p.add_argument("--text-field", default="documents")
    p.add_argument("--prompt-template", default=DataConfig.prompt_template)
    p.add_argument("--completion-template", default=DataConfig.completion_template)
    p.add_argument("--recipe", metavar="RECIPE", help="take the data settings (task, chat format, templates, fields, "
                   "chat template and its variables, system prompt) from a training recipe's data section, so the "
                   "held-out records are read as training read its own; --data still names the records, and the "
                   "flags for those settings are then refused")
    p.add_argument("--chat-format", default="auto", choices=CHAT_FORMATS,
                   help="task chat: how records hold a conversation (default auto: messages, ShareGPT or Alpaca by "
                        "their fields; template: the user turn from --prompt-template, the assistant's from "
                        "--completion-template, as a recipe's data.chat_format: template)")
    p.add_argument("--chat-template", help="task chat: a .jinja file or a named template (chatml) instead of the "
                                           "model's")
    p.add_argument("--template-var", action="append", default=[], metavar="KEY=VALUE",
                   help="task chat: a template variable, e.g. enable_thinking=false (repeatable)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"tokens per sequence (default {DEFAULT_SEQ_LEN}; with --generate the prompt and its new "
                        "tokens, default the model's context; capped, with a notice, at the model's context)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"sequences per batch (default {DEFAULT_BATCH_SIZE}); with --generate, prompts completed "
                        "together, left-padded (default 1: each completion exactly what `loratune generate` prints; "
                        "more is faster, equal up to float rounding)")
    p.add_argument("--max-examples", type=positive_int, default=None, help="only the first N records")
    p.add_argument("--generate", action="store_true",
                   help="complete each prompt greedily and score it against its reference (ROUGE-L needs "
                        "pip install 'loratune[eval]')")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"with --generate: tokens per completion at most (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--report", metavar="DIR", help="with --generate: write generations.jsonl, report.json, "
                                                   "report.md and rouge_l.png into this new directory")
    p.add_argument("--overwrite", action="store_true", help="with --report: replace the report loratune wrote there")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (perplexity null where it overflows, loss >= 50)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.generate:
        return run_generate(args)
    if args.report or args.overwrite or args.max_new_tokens is not None:
        raise ConfigError("--report, --overwrite and --max-new-tokens apply to --generate")
    cfg = _data_config(args)
    model, tokenizer, device, _ = load_for_inference(args)
    records = load_records(args.data, cfg)
    if args.max_examples is not None:
        records = records[:args.max_examples]
    seq_len = _seq_len(args.seq_len or DEFAULT_SEQ_LEN, model.config.context_length)
    examples = build_examples(records, cfg, tokenizer, seq_len)
    batches = Batches(examples, args.batch_size or DEFAULT_BATCH_SIZE, shuffle=False, pad_id=tokenizer.pad_id,
                      drop_last=False)
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


_DATA_FLAGS = {"task": "causal_lm", "text_field": "documents", "prompt_template": DataConfig.prompt_template,
               "completion_template": DataConfig.completion_template, "chat_format": "auto", "chat_template": None,
               "template_var": []}


def _data_config(args: argparse.Namespace) -> DataConfig:
    if args.recipe:
        given = [f"--{k.replace('_', '-')}" for k, default in _DATA_FLAGS.items() if getattr(args, k) != default]
        if given:
            raise ConfigError(f"--recipe gives the data settings: leave out {', '.join(given)} (or --recipe)")
        from ..recipe import load_recipe

        data = load_recipe(args.recipe).data
        return replace(data, source=args.data, val_source=None, val_fraction=0.0, shuffle=False,
                                   max_examples=None)

    if args.task != "chat" and (args.chat_template or args.template_var or args.chat_format != "auto"):
        raise ConfigError("--chat-format, --chat-template and --template-var apply to --task chat")
    variables = template_variables(args.template_var)
    return DataConfig(source=args.data, task=args.task, text_field=args.text_field,
                      prompt_template=args.prompt_template, completion_template=args.completion_template,
                      chat_format=args.chat_format, chat_template=args.chat_template, template_kwargs=variables,
                      val_fraction=0.0, shuffle=False)


def _seq_len(asked: int, context: int) -> int:
    """``--seq-len``, capped at the model's context, saying so (a silent cap would change what is measured)."""
    if asked > context:
        log.warning(f"--seq-len {asked} capped to {context}, the model's context")
    return min(asked, context)


# --- --generate ---------------------------------------------------------------------------------------------------

def run_generate(args: argparse.Namespace) -> int:
    """Every check that can refuse comes before the model runs, and nothing is written before all completions
    are scored: a refused or failed run leaves no report behind."""
    from ..adapters.lora import adapters_disabled
    from ..generate.scoring import complete_all, held_out_prompts, require_rouge, score

    cfg = _data_config(args)
    if cfg.task == "causal_lm":
        raise ConfigError("--generate needs prompts and references: --task completion (the prompt and completion "
                          "templates) or --task chat (the last assistant turn is the reference)")
    require_rouge()
    report = _claim_report_dir(args) if args.report else None
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    records = load_records(args.data, cfg)
    if args.max_examples is not None:
        records = records[:args.max_examples]
    model, tokenizer, _, lora = load_for_inference(args)
    context = model.config.context_length
    seq_len = _seq_len(args.seq_len or context, context)
    if seq_len - max_new < 1:
        raise ConfigError(f"--max-new-tokens {max_new} leaves no room for a prompt in {seq_len} tokens (--seq-len, "
                          "or the model's context): lower --max-new-tokens")
    cases = held_out_prompts(records, cfg, tokenizer, seq_len - max_new, args.data)
    cut = sum(c.cut > 0 for c in cases)
    if cut:
        log.warning(f"{cut} of {len(cases)} prompts were cut to fit {seq_len - max_new} tokens "
                    f"({seq_len} less --max-new-tokens {max_new})")
    names = ["base", "adapter"] if lora is not None else ["base"]
    scores: dict[str, list] = {}
    completions: dict[str, list] = {}
    for name in names:
        with adapters_disabled(model) if name == "base" and lora is not None else contextlib.nullcontext():
            completions[name] = complete_all(model, cases, tokenizer, max_new, args.batch_size or 1,
                                             progress=lambda n, name=name: log.info(
                                                 f"{name}: {n}/{len(cases)} prompts completed"))
        scores[name] = [score(c, case.reference) for c, case in zip(completions[name], cases)]
    result = _summary(args, cfg, cases, scores, seq_len, max_new)
    if report is not None:
        _write_report(report, args.overwrite, cases, completions, scores, result)
        log.info(f"report: {report}")
    print(json.dumps(result, allow_nan=False) if args.json else _table(result))
    return 0


def _summary(args: argparse.Namespace, cfg: DataConfig, cases: list, scores: dict[str, list], seq_len: int,
             max_new: int) -> dict[str, Any]:
    from ..generate.scoring import ROUGE_SETTINGS, difference, summarize

    settings = {"task": cfg.task, "max_new_tokens": max_new, "decoding": "greedy", "seq_len": seq_len,
                "batch_size": args.batch_size or 1, "max_examples": args.max_examples, "dtype": args.dtype,
                "rouge": ROUGE_SETTINGS}
    if cfg.task == "completion" or cfg.chat_format == "template":
        settings.update(prompt_template=cfg.prompt_template, completion_template=cfg.completion_template)
    if cfg.task == "chat":
        settings.update(chat_format=cfg.chat_format, chat_template=cfg.chat_template, template_vars=cfg.template_kwargs)
    if args.recipe:
        settings["recipe"] = args.recipe
    result = {"model": args.model, "adapter": args.adapter, "data": args.data, "examples": len(cases),
              "prompts_cut": sum(c.cut > 0 for c in cases), "settings": settings,
              "reference": {"tokens": sum(c.reference_tokens for c in cases) / len(cases),
                            "words": sum(len(c.reference.split()) for c in cases) / len(cases)},
              "models": {name: summarize(s) for name, s in scores.items()}}
    if "adapter" in scores:
        result["difference"] = difference(scores["base"], scores["adapter"])
    return result


def _table(result: dict[str, Any]) -> str:
    """The means as a Markdown table: one row per model, the reference's lengths, and the difference."""
    rows = ["| | ROUGE-L | exact match | tokens | words | stopped |", "|---|---:|---:|---:|---:|---:|",
            f"| reference | | | {result['reference']['tokens']:.1f} | {result['reference']['words']:.1f} | |"]
    n = result["examples"]
    labels = {"base": f"base ({result['model']})", "adapter": f"adapter ({result['adapter']})"}
    for name, m in result["models"].items():
        rows.append(f"| {labels[name]} | {m['rouge_l']:.4f} | {m['exact']:.1%} | {m['tokens']:.1f} | "
                    f"{m['words']:.1f} | {m['finished']}/{n} |")
    if "difference" in result:
        d = result["difference"]
        rows.append(f"| adapter - base | {d['rouge_l']:+.4f} | {100 * d['exact']:+.1f} pt | {d['tokens']:+.1f} | "
                    f"{d['words']:+.1f} | |")
        rows.append(f"\nROUGE-L per prompt, adapter against base: {d['better']} higher, {d['worse']} lower, "
                    f"{d['same']} the same (of {n}).")
    return "\n".join(rows)


def _claim_report_dir(args: argparse.Namespace) -> Path:
    """Refuse what must be refused before anything runs (runtime/outdir.py's rules); creates nothing."""
    from ..runtime.outdir import owned_outputs, prepare_output_dir, refuse_inputs_inside, refuse_replacing

    out = Path(args.report).expanduser()
    owned = owned_outputs(out) if out.is_dir() else set()
    prepare_output_dir(out, flag="--report", overwrite=args.overwrite, create=False,
                       remedy="pass --overwrite to replace the report there, or choose another --report")
    refuse_inputs_inside(out, [("the model", args.model), ("the adapter", args.adapter), ("the data", args.data),
                               ("the chat template", args.chat_template)], flag="--report")
    if args.overwrite:
        refuse_replacing(out, REPORT_OUTPUTS, owned, flag="--report")
    return out


def _write_report(out: Path, overwrite: bool, cases: list, completions: dict[str, list],
                  scores: dict[str, list], result: dict[str, Any]) -> None:
    from ..runtime.outdir import owned_outputs, record_outputs, remove_outputs

    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_outputs(out, owned_outputs(out) & set(REPORT_OUTPUTS))
    record_outputs(out, REPORT_OUTPUTS)
    lines = []
    for i, case in enumerate(cases):
        row = {"index": i, "where": case.where, "prompt": case.prompt, "prompt_tokens": len(case.ids),
               "prompt_cut": case.cut, "reference": case.reference, "reference_tokens": case.reference_tokens,
               "reference_words": len(case.reference.split())}
        for name in completions:
            row[name] = {"completion": completions[name][i].text, **asdict(scores[name][i])}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    _write_text(out / "generations.jsonl", "".join(lines))
    _write_text(out / "report.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
    _write_text(out / "report.md", _markdown(result, cases, completions))
    _plot(out / "rouge_l.png", scores)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _markdown(result: dict[str, Any], cases: list, completions: dict[str, list], samples: int = 3) -> str:
    s = result["settings"]
    head = [f"# Generation report: {result['data']}", "",
            (f"{result['examples']} prompts ({s['task']}), greedy, at most {s['max_new_tokens']} new tokens; "
             f"ROUGE-L: {s['rouge']}; {result['prompts_cut']} prompts cut to fit {s['seq_len']} tokens."), "",
            _table(result), "", "## Samples", ""]
    for i, case in enumerate(cases[:samples]):
        head += [f"### {case.where}", "", "Prompt (its end):", "", _quote(case.prompt[-400:]), "",
                 "Reference:", "", _quote(case.reference), ""]
        for name in completions:
            head += [f"{name.capitalize()}:", "", _quote(completions[name][i].text), ""]
    return "\n".join(head)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def _plot(path: Path, scores: dict[str, list]) -> None:
    """Per-prompt ROUGE-L: adapter against base (a point above the diagonal: the adapter did better), or
    without an adapter, the distribution. Skipped, with a notice, where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning(f"matplotlib is not installed: skipping {path.name} (pip install 'loratune[plot]')")
        return
    fig, ax = plt.subplots(figsize=(5, 5) if "adapter" in scores else (6, 4), dpi=110)
    base = [s.rouge_l for s in scores["base"]]
    if "adapter" in scores:
        adapter = [s.rouge_l for s in scores["adapter"]]
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        ax.scatter(base, adapter, s=14, alpha=0.7)
        ax.set_xlabel(f"base ROUGE-L (mean {sum(base) / len(base):.3f})")
        ax.set_ylabel(f"adapter ROUGE-L (mean {sum(adapter) / len(adapter):.3f})")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("ROUGE-L per prompt")
    else:
        ax.hist(base, bins=20, range=(0, 1))
        ax.set_xlabel(f"ROUGE-L (mean {sum(base) / len(base):.3f})")
        ax.set_ylabel("prompts")
        ax.set_title("ROUGE-L per prompt")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
