"""``loratune export``: a model or an adapter in another runtime's format, one verb for all of them.

- ``--format gguf``: a whole-model GGUF of the base, or of the base with ``--adapter`` merged
  (``--merge``), for llama.cpp, Ollama, LM Studio; with ``--adapter`` and no ``--merge``, the adapter
  alone as a LoRA GGUF. An Ollama ``Modelfile`` is written beside it (``--no-modelfile``: none).
- ``--format hf``: the Hugging Face directory ``loratune merge`` writes (the base re-saved without an adapter).
- ``--format peft``: the adapter in the PEFT format, checked by loading it onto the model first.

Every refusal is one line and comes before anything is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..adapters.peft_format import load_adapter, resolve_adapter_dir, save_adapter
from ..errors import ConfigError
from ..export.gguf_model import GGUF_PY_OUTTYPES, LLAMA_CPP_OUTTYPES, check_outtype, tokenizer_metadata, \
    write_model_gguf
from ..export.modelfile import MODELFILE, write_modelfile
from ..hub.export import config_dtype
from ..hub.files import read_config
from ..hub.gguf_file import is_gguf_path, read_gguf
from ..merge import MergePlan, merge_record, merged_model, refuse_repeat, save_merged
from ..models import load_model, resolve_model
from ..models.registry import family_for_config
from ..runtime.fsutil import atomic_dir
from ..runtime.outdir import prepare_output_dir, refuse_inputs_inside
from .common import add_model_args, device_and_dtype, log

FORMATS = ("gguf", "hf", "peft")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export the model or adapter as GGUF (llama.cpp, Ollama), HF or PEFT",
                       description="--format gguf: the base, or the base with --adapter merged (--merge), as one "
                                   "GGUF file for llama.cpp / Ollama / LM Studio, with the tokenizer and chat "
                                   "template inside and an Ollama Modelfile beside it; --adapter without --merge: "
                                   "the adapter as a LoRA GGUF. --format hf: the Hugging Face directory `loratune "
                                   "merge` writes. --format peft: the adapter re-saved in the PEFT format. "
                                   "See docs/gguf.md.")
    add_model_args(p)
    p.add_argument("--adapter", default=None, help="adapter directory (PEFT format), hub id or LoRA adapter GGUF")
    p.add_argument("--merge", action="store_true", help="fold --adapter into the base weights (whole-model GGUF "
                   "or HF directory)")
    p.add_argument("--format", required=True, choices=FORMATS, help="gguf (a .gguf file), hf or peft (directories)")
    p.add_argument("--out", required=True, help="the .gguf file (--format gguf) or the output directory")
    p.add_argument("--outtype", default=None, help="GGUF tensor type: " + ", ".join(GGUF_PY_OUTTYPES) + " (written "
                   "with gguf-py; default f16), or llama.cpp's K-quants " + ", ".join(LLAMA_CPP_OUTTYPES)
                   + " (need llama-cpp-python)")
    p.add_argument("--no-modelfile", action="store_true", help="--format gguf: no Ollama Modelfile beside the file")
    p.add_argument("--overwrite", action="store_true", help="--format gguf: replace an existing --out file (and "
                   "the Modelfile beside it); directories are never replaced")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    device, dtype = device_and_dtype(args)
    inputs = [("the model", args.model), ("the adapter", args.adapter)]
    if args.format == "gguf":
        outtype = check_outtype(args.outtype or "f16")
        out, modelfile = _gguf_outputs(args, inputs)
        return _export_gguf(args, out, modelfile, outtype, device, dtype)
    out = prepare_output_dir(args.out, create=False, remedy="choose a new --out")  # new or empty: so no input there
    refuse_inputs_inside(out, inputs)
    if args.format == "peft":
        return _export_peft(args, out, device, dtype)
    return _export_hf(args, out, device, dtype)


def _check_flags(args: argparse.Namespace) -> None:
    if args.merge and not args.adapter:
        raise ConfigError("--merge folds an --adapter into the base: give the --adapter")
    if args.format == "peft" and (not args.adapter or args.merge):
        raise ConfigError("--format peft writes an adapter: give --adapter, without --merge" if not args.merge else
                          "--format peft writes the adapter alone: drop --merge (or use --format hf or gguf)")
    if args.format == "hf" and args.adapter and not args.merge:
        raise ConfigError("--format hf writes a whole model: add --merge to fold the adapter in, or use --format "
                          "peft (the adapter alone)")
    if args.format != "gguf" and args.outtype is not None:
        raise ConfigError(f"--outtype is a GGUF tensor type; --format {args.format} writes the weights as they are")
    if args.format != "gguf" and args.overwrite:
        raise ConfigError(f"--overwrite replaces a GGUF file; --format {args.format} writes a directory, which is "
                          "never replaced: choose a new --out")


def _gguf_outputs(args: argparse.Namespace, inputs: list) -> tuple[Path, Path | None]:
    """The GGUF file and the Modelfile beside it, checked to be writable and not inputs (nothing is created)."""
    out = Path(args.out).expanduser()
    if not is_gguf_path(out):
        raise ConfigError(f"--out {out} must name a .gguf file (llama.cpp, Ollama and loratune know GGUF files "
                          "by that suffix)")
    modelfile = None if args.no_modelfile else out.parent / MODELFILE
    for path, what in ((out, "--out"), (modelfile, f"the {MODELFILE} beside --out")):
        if path is None:
            continue
        if path.is_dir():
            raise ConfigError(f"{what} {path} is a directory: choose another --out")
        refuse_inputs_inside(path, inputs)
        if path.exists() and not args.overwrite:
            advice = " or --no-modelfile" if path == modelfile else ""
            raise ConfigError(f"{what} {path} exists: pass --overwrite to replace it{advice}, or choose another --out")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create --out {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write --out {out}: {parent} is not writable")
    return out, modelfile


def _export_gguf(args: argparse.Namespace, out: Path, modelfile: Path | None, outtype: str, device, dtype) -> int:
    model_dir = resolve_model(args.model)
    if args.adapter and not args.merge:
        from ..export.gguf_lora import write_lora_gguf

        adapter_dir = resolve_adapter_dir(args.adapter)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_lora_gguf(model_dir, adapter_dir, out, outtype)
        base = Path(args.model).expanduser() if is_gguf_path(args.model) else model_dir
        facts = family_for_config(read_config(model_dir)).gguf
        meta = tokenizer_metadata(model_dir, facts.arch)
        print(f"wrote {out}")
        if modelfile is not None:
            print(f"wrote {write_modelfile(out.parent, base, meta, adapter=out)}")
        return 0
    if args.adapter:
        adapter_dir = resolve_adapter_dir(args.adapter)
        record = merge_record(args.adapter, adapter_dir, args.model)
        refuse_repeat(read_config(model_dir), record, args.model)
        model, merged = merged_model(MergePlan([adapter_dir], [1.0], base_model=args.model), model_dir, "auto",
                                     device, dtype, None)
        log.info(f"merged {args.adapter} into {merged} layers of {args.model}")
    else:
        model, _ = load_model(model_dir, dtype=dtype, device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_model_gguf(model, model_dir, out, outtype)
    print(f"wrote {out}")
    if modelfile is not None:
        meta = {k: v for k, v in read_gguf(out).metadata.items() if k.startswith("tokenizer.")}
        print(f"wrote {write_modelfile(out.parent, out, meta)}")
    return 0


def _export_hf(args: argparse.Namespace, out: Path, device, dtype) -> int:
    """What ``loratune merge`` writes for one adapter (or the base re-saved, without one)."""
    model_dir = resolve_model(args.model)
    base_config = read_config(model_dir)
    out_dtype = config_dtype(base_config)
    records = []
    if args.adapter:
        adapter_dir = resolve_adapter_dir(args.adapter)
        records = [merge_record(args.adapter, adapter_dir, args.model)]
        refuse_repeat(base_config, records[0], args.model)
        model, _ = merged_model(MergePlan([adapter_dir], [1.0], base_model=args.model), model_dir, "auto", device,
                                dtype, out_dtype)
    else:
        model, _ = load_model(model_dir, dtype=dtype, device=device)
    save_merged(model, out, model_dir, base_config, records, out_dtype, "2GB")
    print(f"wrote {out}")
    return 0


def _export_peft(args: argparse.Namespace, out: Path, device, dtype) -> int:
    """The adapter's own files, copied once they load onto the model; a LoRA GGUF adapter is re-saved."""
    adapter_dir = resolve_adapter_dir(args.adapter)
    model, _ = load_model(args.model, dtype=dtype, device=device)
    lora = load_adapter(model, adapter_dir, base_model=args.model)
    if not adapter_dir.is_dir():
        save_adapter(model, out, lora, base_model=args.model)
    else:
        with atomic_dir(out) as tmp:
            for src in sorted(adapter_dir.iterdir()):
                if src.is_file() and not src.name.startswith("."):
                    shutil.copyfile(src, tmp / src.name)
    print(f"wrote {out}")
    return 0
