"""Save and load the trained LoRA tensors with the settings that made them.

A directory with ``adapter_config.json`` (the LoRA config and the base model it was trained on)
and ``adapter_model.safetensors`` (exactly the LoRA tensors, under the model's own names).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import read_json, read_safetensors
from .errors import CheckpointError
from .lora import LoRAConfig, lora_layers
from .targets import inject_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the LoRA tensors of ``model``, keyed as in its state dict."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: nn.Module, out_dir: str | Path, lora: LoRAConfig, base_model: str) -> Path:
    """Write the adapter directory; returns it."""
    if any(m.merged for _, m in lora_layers(model)):
        raise CheckpointError("cannot save a merged adapter: unmerge first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"format": "loratune", "base_model": str(base_model), "lora": asdict(lora)}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Inject the adapter's LoRA layers into ``model`` and load its tensors; returns its config."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError(f"adapter directory {adapter_dir} does not exist")
    config = read_json(adapter_dir / CONFIG_NAME, "adapter config")
    if not isinstance(config.get("lora"), dict):
        raise CheckpointError(f"{adapter_dir / CONFIG_NAME} has no 'lora' section")
    lora = LoRAConfig(**config["lora"])
    tensors = read_safetensors(adapter_dir / WEIGHTS_NAME) if (adapter_dir / WEIGHTS_NAME).is_file() else None
    if tensors is None:
        raise CheckpointError(f"adapter weights not found: {adapter_dir / WEIGHTS_NAME}")
    inject_lora(model, lora)
    expected = {k: v.shape for k, v in model.state_dict().items() if ".lora_" in k}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"adapter in {adapter_dir} does not fit this model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise CheckpointError(f"adapter tensor {k} has shape {tuple(v.shape)}, model expects "
                                  f"{tuple(expected[k])}: the adapter was made for another base model")
    model.load_state_dict(tensors, strict=False)
    return lora
