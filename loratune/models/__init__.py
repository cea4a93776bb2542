"""Model families. Each lives in its own file; :func:`load_model` picks one from config.json."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import read_config, read_state_dict, resolve_model_dir
from ..errors import CheckpointError
from .gpt2 import GPT2, GPT2Config, KVCache

__all__ = ["GPT2", "GPT2Config", "KVCache", "load_model"]

_BLOCK = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")


def load_model(name_or_path: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> tuple[GPT2, Path]:
    """Load a Hugging Face GPT-2 checkpoint (local directory or hub id) as our model.

    Returns the model (in eval mode) and the local directory it came from (for the tokenizer).
    """
    model_dir = resolve_model_dir(name_or_path)
    hf_config = read_config(model_dir)
    config = GPT2Config.from_hf(hf_config)
    state = read_state_dict(model_dir)
    if not state:
        raise CheckpointError(f"the weights in {model_dir} are empty")
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, state) if m}
    if len(blocks) != config.n_layer:  # checked before building: a config.json with n_layer=10**9 must not hang
        raise CheckpointError(f"config.json says n_layer={config.n_layer}, but the weights in {model_dir} hold "
                              f"{len(blocks)} transformer blocks")
    model = GPT2.from_hf_state_dict(config, state, dtype=dtype)
    return model.to(device).eval(), model_dir
