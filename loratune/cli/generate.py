"""``loratune generate``: continue a prompt with a base model, optionally with an adapter; or, with
``--chat``, answer it as the user's message through the model's chat template."""

from __future__ import annotations

import argparse
import sys

import torch

from ..adapters.lora import merge_lora
from ..errors import ConfigError
from ..generate import SamplingConfig, generate
from .common import add_model_args, load_for_inference, log, template_variables


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Continue PROMPT; only the continuation goes to stdout.")
    add_model_args(p)
    p.add_argument("--adapter", help="LoRA adapter to apply: a PEFT directory, a hub id, or a LoRA adapter GGUF")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights first (faster)")
    p.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as a user message with the chat template and its generation prompt; "
                        "stop at the template's end-of-turn token")
    p.add_argument("--system", help="with --chat: a system message first")
    p.add_argument("--chat-template", help="with --chat: a .jinja file or a named template (chatml) instead of "
                                          "the model's")
    p.add_argument("--template-var", action="append", default=[], metavar="KEY=VALUE",
                   help="with --chat: a template variable, e.g. enable_thinking=false (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decoding step with torch.compile (costs seconds to a minute once; "
                        "docs/serving.md says where it helps)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise ConfigError("--prompt is empty: give the text to continue (with --chat: the user's message)")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model, tokenizer, device, lora = load_for_inference(args)
    if lora is not None:
        log.info(f"adapter: {args.adapter} (r={lora.r}, alpha={lora.alpha:g}, targets={','.join(lora.targets)})")
        if args.merge:
            merge_lora(model)
    if not args.chat and (args.system is not None or args.chat_template or args.template_var):
        raise ConfigError("--system, --chat-template and --template-var apply to --chat")
    if args.chat:
        ids, stops = chat_prompt_of(tokenizer, args)
    else:
        # the prompt starts with BOS where the tokenizer has one, as in training and transformers' tokenizer(text)
        ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(args.prompt)
        ids, stops = ids or [tokenizer.eos_id], list(tokenizer.eos_ids)
    prompt = torch.tensor([ids], device=device)
    new = generate(model, prompt, sampling, eos_ids=stops, compile=args.compile)[0].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]  # cut at the first stop
    sys.stdout.write(tokenizer.decode(new) + "\n")
    return 0


def chat_prompt_of(tokenizer, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """The ids of ``--system`` + ``--prompt`` rendered with the generation prompt, and the ids to stop at."""
    from ..data.chat_template import check_template_variables
    from ..generate.chat import chat_prompt

    variables = template_variables(args.template_var)
    check_template_variables(variables, "--template-var")
    return chat_prompt(tokenizer, args.prompt, args.system, args.chat_template, **variables)
