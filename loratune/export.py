"""Write a model as a complete Hugging Face checkpoint directory that transformers loads unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import TOKENIZER_FILES
from .errors import CheckpointError
from .lora import lora_layers


def save_hf_model(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Save config.json, model.safetensors, generation_config.json and the tokenizer files.

    LoRA layers must be merged first (their update would otherwise be lost). The directory is
    written under a temporary name and renamed, so it is complete or absent.
    """
    if any(not m.merged for _, m in lora_layers(model)):
        raise CheckpointError("the model has unmerged LoRA layers: merge them before exporting")
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
                 for k, v in model.to_hf_state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_hf()
        config["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file() and name != "generation_config.json":
                    shutil.copyfile(src, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
