"""Arguments and loading steps that several commands share."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from ..runtime.device import pick_device

log = logging.getLogger("loratune")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory, GGUF file (model.gguf) or Hugging Face hub id (e.g. gpt2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto: the first CUDA "
                   "GPU if there is one, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default: float32)")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    try:
        device = pick_device(args.device)
    except RuntimeError:
        raise ConfigError(f"unknown device {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    return device, DTYPES[args.dtype]


def load_for_inference(args: argparse.Namespace):
    """``--model`` (with ``--device``/``--dtype``), its tokenizer (checked to fit the model's vocabulary)
    and ``--adapter`` if given: what ``generate`` and ``eval`` start from.

    Returns (model, tokenizer, device, the adapter's LoRAConfig or None).
    """
    from ..adapters.peft_format import load_adapter
    from ..data.tokenizer import load_tokenizer
    from ..models import check_tokenizer_fits, load_model

    device, dtype = device_and_dtype(args)
    model, model_dir = load_model(args.model, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(model, tokenizer)
    lora = load_adapter(model, args.adapter, base_model=args.model) if args.adapter else None  # on the model's device
    if args.adapter:
        warn_if_trained_quantized(args.adapter, model_dir)
    return model, tokenizer, device, lora


def warn_if_trained_quantized(adapter: str, model_dir: Path | None = None) -> None:
    """A QLoRA adapter applied to the 16-bit base computes something it was not trained for (the 4-bit
    rounding it learned around is gone): say so, and what keeps it (``loratune merge``, which merges into
    the quantized base it was trained against)."""
    from ..adapters.peft_format import resolve_adapter_dir
    from ..merge.qlora import trained_quantization
    from ..models.gguf_dir import is_gguf_dir

    quant = trained_quantization([resolve_adapter_dir(adapter)])
    if quant is not None and quant.kind == "gguf" and model_dir is not None and is_gguf_dir(model_dir):
        return  # trained on the GGUF's blocks decoded: exactly the weights this GGUF loads as
    if quant is not None:
        log.warning(f"adapter {adapter} was trained against a {quant.kind}-quantized base (QLoRA) and is applied "
                    "here to the full-precision weights, whose outputs differ from what it was trained with; "
                    "`loratune merge` folds it into the quantized base it saw and reports the difference")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or a negative count would silently mean 'all', 'all but N' or a
    default, or make a server refuse every request)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def template_variables(items: list[str]) -> dict:
    """``--template-var KEY=VALUE`` flags as a dict, each value read as YAML (``false`` is False)."""
    from ..bounded_yaml import yaml_value

    variables = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--template-var takes KEY=VALUE, got {item!r}")
        variables[key.strip()] = yaml_value(value)
    return variables
