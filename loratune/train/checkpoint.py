"""Training checkpoints that are complete or absent.

A checkpoint is a directory ``checkpoints/step-000100/`` holding the trainable tensors
(safetensors), the optimizer and scheduler state and the RNG states (``torch.save``, read back
with ``weights_only=True``), and ``state.json`` (written last). It is written under a
temporary name, every file and the directory fsynced, then renamed into place and the parent
directory fsynced, so a crash at any moment leaves either the previous checkpoints or the new
one, never half of it. Saving a step that already has a checkpoint swaps the two with renames
(the old one under ``.old-step-N-PID`` for an instant), and pruning renames before deleting,
so no moment exists where a half-deleted directory looks complete.

What a killed run leaves behind (``.tmp-``, ``.old-`` and ``.trash-`` directories, our own
names only) is cleaned, or in the ``.old-`` case put back, by :func:`clean_checkpoint_dir`,
which training calls before it looks for checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hub.files import read_json, read_safetensors
from ..runtime.finite import check_finite, first_non_finite
from ..runtime.fsutil import atomic_dir, fsync_dir, fsync_tree, replace_dir, write_os_error
from ..dist.checkpoint import is_sharded, load_sharded, save_sharded
from ..dist.world import SINGLE, World
from ..recipe import default_result_fields, fingerprint
from .guards import disk_error

log = logging.getLogger("loratune")

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_SCRATCH_DIR = re.compile(r"^\.(tmp|old|trash)-(step-\d{6,})-(\d+)$")  # ours, left by an unfinished save
FILES = ("trainable.safetensors", "optimizer.pt", "state.json")
"""What a complete checkpoint directory holds (state.json is written last)."""


@dataclass
class TrainState:
    """Where the run stands: the optimizer step reached and the metrics seen so far."""

    step: int
    best_val_loss: float | None = None


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


def save_checkpoint(root: Path, model: nn.Module, optimizer, scheduler, state: TrainState, keep: int,
                    recipe_fields: dict[str, Any] | None = None, world: World = SINGLE, strategy: str = "") -> Path:
    """Write ``root/step-N`` atomically and prune older checkpoints beyond ``keep``.

    With ``recipe_fields`` (``recipe.result_fields``, computed once per run: it reads the data files),
    state.json records the recipe's result-changing fields and their hash, which
    :func:`load_checkpoint` compares on resume.

    A failed write (a full disk above all) removes its temporary directory and raises a
    :class:`~loratune.errors.LoratuneError` that says so; the earlier checkpoints are untouched.
    Trainable tensors holding NaN/Inf are refused (:class:`CheckpointError`) before anything is
    written: a checkpoint on disk is always one a run can resume from.

    In a launched run (``world.distributed``) every rank calls this: the checkpoint is sharded
    (see ``dist/checkpoint.py``) and rank 0 finishes it, renames it into place and prunes.
    """
    final = root / f"step-{state.step:06d}"
    if world.distributed:
        info = {"step": state.step, "best_val_loss": state.best_val_loss, "world_size": world.size,
                "strategy": strategy}
        if recipe_fields is not None:
            info.update(recipe_hash=fingerprint(recipe_fields), recipe_fields=recipe_fields)
        _save_sharded(final, model, optimizer, scheduler, info, world)
        if world.main:
            for stale in list_checkpoints(root)[:-keep]:
                _remove(stale)
        world.barrier()
        return final
    tensors = trainable_state(model)
    check_finite(tensors, f"refusing to save checkpoint {final}", _last_complete(root))
    try:
        # fsynced, then renamed into place; the same step again (a stop right after a periodic save, a resume
        # at the end) is swapped in with the old one aside as .old-step-N-PID, which clean_checkpoint_dir()
        # puts back if we die between the two renames
        with atomic_dir(final) as tmp:
            save_file(tensors, str(tmp / "trainable.safetensors"))
            with open(tmp / "optimizer.pt", "wb") as f:  # a file object: a full disk keeps its OSError as context
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "rng": rng_state()}, f)
            info = {"step": state.step, "best_val_loss": state.best_val_loss}
            if recipe_fields is not None:
                info.update(recipe_hash=fingerprint(recipe_fields), recipe_fields=recipe_fields)
            (tmp / "state.json").write_text(json.dumps(info, default=str))
    except OSError as exc:  # atomic_dir has removed the unfinished directory (and found the OSError a writer hid)
        raise disk_error(exc, f"checkpoint {final}", _last_complete(root)) from None
    for stale in list_checkpoints(root)[:-keep]:
        _remove(stale)
    return final


def _save_sharded(final: Path, model: nn.Module, optimizer, scheduler, info: dict, world: World) -> None:
    """Every rank writes its shards into rank 0's temporary directory; rank 0 adds state.json last and
    renames it into place once all ranks have flushed theirs."""
    if world.any(first_non_finite([p for g in optimizer.param_groups for p in g["params"]]) is not None):
        raise CheckpointError(f"refusing to save checkpoint {final}: a trainable tensor holds NaN or Inf; "
                              f"{_last_complete(final.parent)}")
    tmp = final.with_name(f".tmp-{final.name}-{world.broadcast_int(os.getpid())}")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    error = None
    try:
        info["param_groups"] = save_sharded(tmp, model, optimizer, world)
    except Exception as exc:  # the safetensors writer hides a full disk in its own error
        error = write_os_error(exc)
        if error is None:
            raise
    if world.any(error is not None):
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(error or OSError(f"another rank could not write its shard of {final}"), f"checkpoint {final}",
                         _last_complete(final.parent))
    if world.main:
        info["scheduler"] = scheduler.state_dict()
        (tmp / "state.json").write_text(json.dumps(info, default=str))
        for sub in (tmp / "dcp", tmp / "rng"):
            fsync_tree(sub)
        replace_dir(tmp, final)


def _last_complete(root: Path) -> str:
    kept = list_checkpoints(root)
    return f"the last complete checkpoint is {kept[-1]}" if kept else "no earlier checkpoint exists"


def _remove(path: Path) -> None:
    """Delete a checkpoint: renamed out of sight first, so a half-deleted one never looks complete."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier save that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_checkpoint_dir(root: Path) -> dict[str, int]:
    """Finish what killed runs left under ``root``: drop unfinished writes, restore swapped-out checkpoints.

    Only our own scratch names (``.tmp-step-N-PID``, ``.old-step-N-PID``, ``.trash-step-N-PID``)
    of processes that are no longer running are touched. A ``.old-`` directory is a complete
    checkpoint caught in the middle of a swap: it becomes ``step-N`` again when that is missing.
    Returns how many directories were removed and restored.
    """
    counts = {"removed": 0, "restored": 0}
    if not root.is_dir():
        return counts
    for path in sorted(root.iterdir()):
        match = _SCRATCH_DIR.match(path.name)
        if not match or not path.is_dir() or _pid_alive(int(match.group(3))):
            continue
        kind, name = match.group(1), match.group(2)
        if kind == "old" and not (root / name).exists() and _complete(path):
            os.replace(path, root / name)
            counts["restored"] += 1
        else:
            shutil.rmtree(path, ignore_errors=True)
            counts["removed"] += 1
    if counts["removed"] or counts["restored"]:
        fsync_dir(root)
        log.info(f"cleaned {root}: {counts['removed']} unfinished checkpoint write(s) removed, "
                 f"{counts['restored']} checkpoint(s) restored")
    return counts


def _complete(path: Path) -> bool:
    if is_sharded(path):  # a launched run's: its shards, then state.json (written last)
        return (path / "state.json").is_file()
    return all((path / name).is_file() for name in FILES)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and _complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def check_recipe(info: dict[str, Any], fields: dict[str, Any], path: Path) -> None:
    """Refuse to resume with a recipe whose result-changing fields differ from the checkpoint's,
    naming each difference (a checkpoint without a recorded recipe passes)."""
    saved = info.get("recipe_fields")
    if not isinstance(saved, dict) or info.get("recipe_hash") == fingerprint(fields):
        return
    now = json.loads(json.dumps(fields, default=str))
    defaults = json.loads(json.dumps(default_result_fields(), default=str))  # fields added since a checkpoint was
    # made (quantize, lora.use_dora ...) match it while they keep their default: such a run computed the same thing
    saved = {**{k: v for k, v in defaults.items() if k in now}, **saved}
    changed = [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"the recipe differs from the one checkpoint {path} was made with, so resuming would not "
                          f"continue the same run ({'; '.join(changed[:6])}). Restore those values, or pass "
                          "--force-resume to continue with the new ones anyway")


_OLD_LORA_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<which>[AB])\.(?P<part>[^.]+)$")


def _current_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints made before adapters had names keep LoRA tensors as ``...c_attn.lora_A.q``: they are the
    ``default`` adapter's (``...c_attn.lora.default.lora_A.q``)."""
    def rename(key: str) -> str:
        m = _OLD_LORA_KEY.match(key)
        return f"{m['layer']}.lora.default.lora_{m['which']}.{m['part']}" if m and ".lora." not in key else key
    return {rename(k): v for k, v in tensors.items()}


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, recipe_fields: dict[str, Any] | None = None,
                    force: bool = False, world: World = SINGLE) -> TrainState:
    """Restore trainable tensors, optimizer, scheduler and RNG from a checkpoint directory.

    Everything is read and checked before anything is changed; ``optimizer.pt`` is read with
    ``weights_only=True``, so a tampered file cannot run code, and a damaged one is a
    :class:`CheckpointError`. With ``recipe_fields`` (and not ``force``), a recipe whose result-changing
    fields differ from the checkpoint's is refused (:func:`check_recipe`).
    """
    info = read_json(path / "state.json", "checkpoint state")
    if recipe_fields is not None and not force:
        check_recipe(info, recipe_fields, path)
    step = info.get("step")
    named = _STEP_DIR.match(path.name)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or (named and int(named.group(1)) != step):
        raise CheckpointError(f"{path / 'state.json'} names step {step!r}, which does not fit the directory name")
    if is_sharded(path):
        return _load_sharded(path, info, model, optimizer, scheduler, world)
    if world.distributed:
        raise CheckpointError(f"checkpoint {path} was written by a single-process run, and a launched run reads "
                              "sharded checkpoints only: resume it without torchrun (loratune train ... --resume)")
    tensors = _current_names(read_safetensors(path / "trainable.safetensors"))
    check_finite(tensors, f"checkpoint {path}", "resume from an earlier checkpoint, or start over")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise CheckpointError(f"checkpoint {path} holds other trainable tensors than this run "
                              f"({len(tensors)} vs {len(expected)}): was it made by another recipe?")
    for name, tensor in tensors.items():
        if params[name].shape != tensor.shape:
            raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"this run expects {tuple(params[name].shape)}")
    try:
        extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusing a pickle that would run code lands here too
        raise CheckpointError(f"refusing to load {path / 'optimizer.pt'}: it is corrupt or holds more than "
                              f"tensors and plain data ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                              ) from None
    if not isinstance(extra, dict) or not {"optimizer", "scheduler", "rng"} <= set(extra):
        raise CheckpointError(f"{path / 'optimizer.pt'} does not hold the optimizer, scheduler and RNG state")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    try:
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path / 'optimizer.pt'} does not fit this run's optimizer or scheduler "
                              f"({type(exc).__name__}: {exc}); was it made by another recipe?") from None
    return TrainState(step=step, best_val_loss=info.get("best_val_loss"))


def _load_sharded(path: Path, info: dict, model: nn.Module, optimizer, scheduler, world: World) -> TrainState:
    """A launched run's checkpoint, on this world (see dist/checkpoint.py); the random generators are
    restored on the same world size and reseeded from (seed, step, rank) on another."""
    groups, saved_world, sched = info.get("param_groups"), info.get("world_size"), info.get("scheduler")
    if not isinstance(groups, list) or not isinstance(saved_world, int) or not isinstance(sched, dict) \
            or not isinstance(sched.get("base_lrs"), list) or len(sched["base_lrs"]) != len(scheduler.base_lrs):
        raise CheckpointError(f"{path / 'state.json'} lacks the optimizer groups, world size or scheduler state, or "
                              "they do not fit this run: was it made by another recipe?")
    restored = load_sharded(path, model, optimizer, groups, world, saved_world)
    scheduler.load_state_dict(sched)
    if not restored:
        seed = (info.get("recipe_fields") or {}).get("seed", 0)
        torch.manual_seed((int(seed) + info["step"] * 1_000_003 + world.rank) % 2**63)
        log.info(f"checkpoint {path} was made by {saved_world} process(es), this run has {world.size}: random "
                 "generators reseeded (dropout masks differ from an uninterrupted run; the data order does not)")
    return TrainState(step=info["step"], best_val_loss=info.get("best_val_loss"))
