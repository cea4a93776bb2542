"""Memory-saving runs on CPU: let glibc hand freed tensors back to the OS at once.

glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up to
32 MiB) each time a large block is freed; a training step's tensors of a few MiB then land in the
heap between longer-lived ones, and the heap keeps the holes. With ``quantize`` or
``activation_checkpointing`` the live memory of a step is small, so those holes dominate: on a
Llama-3.2-1B shape with QLoRA and checkpointing (fp32, seq 512) the step's peak RSS was 3.09 GB
with glibc's defaults and 2.18 GB with the threshold pinned at 1 MiB, for 25-28 s per step instead
of 24.5-24.8 s (page faults of the fresh mappings; /tmp measurements in issue 14's notes). Runs
that asked to save memory get the pinned threshold; others keep glibc's defaults. The same is
available to any process through the environment: ``MALLOC_MMAP_THRESHOLD_=1048576``.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger("loratune")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20


def prefer_memory(device: torch.device) -> bool:
    """Pin glibc's mmap threshold at 1 MiB for this process (CPU runs only); True where it took effect."""
    if device.type != "cpu":
        return False
    try:
        ok = bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    if ok:
        log.info("memory: freed tensors of 1 MiB and more go straight back to the OS (glibc mmap threshold pinned)")
    return ok
