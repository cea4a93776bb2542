"""Numeric precision of a run: choosing it (``auto``), storing weights in it, and autocast.

- ``fp32``: everything in float32.
- ``bf16-mixed``: float32 weights, matmuls under bf16 autocast.
- ``bf16-true``: weights stored in bf16 (no cast each step); LoRA keeps float32 masters, and full
  fine-tuning updates its bf16 weights with Kahan-compensated AdamW (:mod:`loratune.train.optim`).
- ``auto``: bf16-true where the hardware multiplies bf16 fast (CUDA GPUs with bf16, CPUs with AMX
  tiles), fp32 elsewhere: on CPUs without AMX, bf16 matmuls run slower than fp32 ones.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..runtime.device import cpu_flags


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matrix units): asked of PyTorch, else /proc/cpuinfo."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    flags = cpu_flags()
    return flags is not None and "amx_bf16" in flags


def choose_precision(device: torch.device) -> tuple[str, str]:
    """``auto``'s choice for ``device`` and why, e.g. ('fp32', 'this CPU has no AMX: ...')."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-true", f"{torch.cuda.get_device_name(device)} multiplies bf16 natively"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no fast bf16"
    if device.type == "cpu":
        if cpu_has_amx():
            return "bf16-true", "this CPU has AMX tiles, which multiply bf16 several times faster than fp32"
        return "fp32", "this CPU has no AMX tiles: bf16 matmuls run slower than fp32 here"
    return "fp32", f"no bf16 speed data for {device.type}"


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str | None]:
    """The concrete precision for a recipe's value, with the reason when ``auto`` chose it."""
    if precision != "auto":
        return precision, None
    return choose_precision(device)


def store_in_bf16(model: nn.Module, finetune: str) -> None:
    """bf16-true: frozen weights live in bf16 (no cast each step); LoRA keeps float32 masters.

    With full fine-tuning every weight is bf16; the optimizer compensates the rounding of its
    updates (Kahan summation), so small updates are not lost.
    """
    for p in model.parameters():
        if not p.requires_grad or finetune == "full":
            p.data = p.data.to(torch.bfloat16)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast for bf16-mixed; a no-op context otherwise."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
