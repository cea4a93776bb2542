"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), stored as safetensors.

A launched run's checkpoint ``step-N/`` holds ``dcp/`` (every rank writes the slices of the
trainable weights and of their AdamW moments that it owns, through DCP's safetensors storage:
``shard-0000R-model-00001-of-00001.safetensors`` with each slice's offsets in the file header),
``rng/rank-0000R.safetensors`` (each rank's random-generator state) and ``state.json`` (step,
scheduler, learning rates, world size and strategy; written last by rank 0). The directory is
written under a temporary name and renamed into place by rank 0 after every rank has flushed its
files, as single-process checkpoints are (see ``train/checkpoint.py``): complete or absent.

Nothing in it is a pickle: DCP's default format keeps its index in a pickle and loads non-tensor
entries with ``weights_only=False``; the safetensors storage has neither, and the only non-tensor
state (scheduler, learning rates) is JSON.

DCP reshards on load: the tensors are named by parameter (the same names in DDP, FSDP2 and a
single process), so a checkpoint resumes on any world size and either strategy, or in one process
without torchrun. Only the random-generator states need the same world size: on another, each rank
is reseeded (dropout masks then differ from an uninterrupted run; the data order does not, it
depends only on the step).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError
from ..hub.files import read_safetensors
from ..runtime.finite import first_non_finite
from .world import World

SHARDS_DIR = "dcp"
RNG_DIR = "rng"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's view of the trainable weights and the optimizer, named by parameter (buffers left out:
    a quantized base is not training state)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = trainable_names(model)
    weights = {k: v for k, v in get_model_state_dict(model, options=_options()).items() if k in names}
    optim = get_optimizer_state_dict(model, optimizer, options=_options())
    return weights, optim


def save_sharded(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> list[dict]:
    """Every rank writes its shards under ``tmp`` (a collective); returns the optimizer's param groups
    without their parameters (for state.json)."""
    import torch.distributed.checkpoint as dcp

    weights, optim = _state(model, optimizer)
    writer = dcp.HuggingFaceStorageWriter(str(tmp / SHARDS_DIR), save_distributed=True)
    try:
        dcp.save({"model": weights, "optim": optim["state"]}, storage_writer=writer)  # each rank fsyncs its files
    except CheckpointException as exc:  # a BaseException: a rank's write failed (a full disk ...)
        raise OSError(f"writing the shards failed: {_last_line(exc)}") from None
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    rng = tmp / RNG_DIR / f"rank-{world.rank:05d}.safetensors"
    save_file(_rng_tensors(), str(rng))
    with open(rng, "rb") as handle:
        os.fsync(handle.fileno())
    return [{k: v for k, v in group.items() if k != "params"} for group in optim["param_groups"]]


def is_sharded(path: Path) -> bool:
    return (path / SHARDS_DIR).is_dir()


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[dict],
                 world: World, saved_world: int) -> bool:
    """Read a sharded checkpoint into ``model`` and ``optimizer`` on this world (any size, or no process
    group at all); returns whether this rank's random-generator state was restored (same world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights, optim = _state(model, optimizer)
    shards = path / SHARDS_DIR
    stored = _stored_names(shards)
    wanted = {f"model.{k}" for k in weights}
    if not wanted <= stored:
        missing = sorted(wanted - stored)
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} of this run's trainable tensors (e.g. "
                              f"{missing[0][6:]}): was it made by another recipe?")
    if len(groups) != len(optim["param_groups"]):
        raise CheckpointError(f"checkpoint {path} has {len(groups)} optimizer groups, this run "
                              f"{len(optim['param_groups'])}: "
                              "was it made by another recipe?")
    target = {"model": weights, "optim": optim["state"]}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(str(shards)))
    except (Exception, CheckpointException) as exc:  # DCP wraps shape mismatches and unreadable files alike
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {_last_line(exc)}; resume from an "
                              "earlier checkpoint, or start over") from None
    if world.any(first_non_finite(list(target["model"].values())) is not None):
        raise CheckpointError(f"checkpoint {path} holds NaN or Inf in its trainable tensors: resume from an earlier "
                              "checkpoint, or start over")
    set_model_state_dict(model, target["model"], options=_options())
    for group, saved in zip(optim["param_groups"], groups):
        group.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr")})
    set_optimizer_state_dict(model, optimizer, {"state": target["optim"], "param_groups": optim["param_groups"]},
                             options=_options())
    rng = path / RNG_DIR / f"rank-{world.rank:05d}.safetensors"
    if saved_world != world.size or not rng.is_file():
        return False
    _set_rng(read_safetensors(rng))
    return True


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _stored_names(shards: Path) -> set[str]:
    from safetensors import safe_open

    files = sorted(shards.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{shards} holds no shard files: the checkpoint is damaged; resume from an earlier one")
    names = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                names.update(handle.keys())
        except Exception as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file ({exc}); the checkpoint is damaged: "
                                  "resume from an earlier one") from None
    return names


def _rng_tensors() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[f"cuda.{i}"] for i in range(len(state) - 1) if f"cuda.{i}" in state]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
