"""Where a run executes: which device a name means, what its CPU can do, and how much memory is left on it.

Shared by training (the resource guards' estimate against what is free), serving (the KV cache
for ``--max-batch`` checked before it is allocated) and the inference commands (``--device``).
"""

from __future__ import annotations

from pathlib import Path

import torch


def pick_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA GPU if there is one, else the CPU; anything else as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as /proc/cpuinfo lists them (``amx_bf16``, ``avx512_bf16`` ...);
    None where that file cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("flags")), None)
    return None if line is None else frozenset(line.split(":", 1)[1].split())


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_available() -> int | None:
    """Room left under this container's memory limit (cgroup v2, else v1), page cache counted as free."""
    v2 = Path("/sys/fs/cgroup")
    limit, used = _read_int(v2 / "memory.max"), _read_int(v2 / "memory.current")
    stat = v2 / "memory.stat"
    if limit is None or used is None:
        v1 = v2 / "memory"
        limit, used = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
        stat = v1 / "memory.stat"
        if limit is None or used is None or limit >= 2**60:  # v1 says "no limit" with a huge number
            return None
    reclaimable = 0
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                reclaimable = int(value)
                break
    except (OSError, ValueError):
        pass
    return max(0, limit - used + reclaimable)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may still allocate on ``device``; None where we cannot tell.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``). CPU on Linux: MemAvailable
    from /proc/meminfo, or less when a cgroup (container) limit leaves less room.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
        return min(found) if found else None
    return None
