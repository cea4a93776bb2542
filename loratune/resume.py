"""Training checkpoints that are complete or absent.

A checkpoint is a directory ``checkpoints/step-000100/`` holding the trainable tensors
(safetensors), the optimizer and scheduler state and the RNG states (``torch.save``, read back
with ``weights_only=True``), and ``state.json``. It is written under a temporary name, every
file fsynced, then renamed into place, so a crash at any moment leaves either the previous
checkpoints or the new one, never half of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import read_json, read_safetensors
from .errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainState:
    """Where the run stands: the optimizer step reached and the metrics seen so far."""

    step: int
    best_val_loss: float | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changes, by parameter name (shared tensors once)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, model: nn.Module, optimizer, scheduler, state: TrainState, keep: int) -> Path:
    """Write ``root/step-N`` atomically and prune older checkpoints beyond ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": state.step, "best_val_loss": state.best_val_loss}))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final} ({exc}); earlier checkpoints are kept") from None
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp directories are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Restore trainable tensors, optimizer, scheduler and RNG from a checkpoint directory."""
    info = read_json(path / "state.json", "checkpoint state")
    tensors = read_safetensors(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise CheckpointError(f"checkpoint {path} holds other trainable tensors than this run "
                              f"({len(tensors)} vs {len(expected)}): was it made by another recipe?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                      f"this run expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    try:
        extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path / 'optimizer.pt'}: {str(exc).splitlines()[0]}") from None
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return TrainState(step=int(info["step"]), best_val_loss=info.get("best_val_loss"))
