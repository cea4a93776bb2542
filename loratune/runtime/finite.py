"""The one check that weights are finite, used wherever weights are read or written.

A NaN or Inf weight never heals: every output it touches is NaN from then on, so a model,
adapter or training snapshot that holds one is refused by name when it is loaded or saved,
instead of producing garbage text or a NaN loss far from the cause.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import CheckpointError


def first_non_finite(tensors: Sequence[torch.Tensor]) -> int | None:
    """Index of the first floating-point tensor holding a NaN or Inf, or None when all are finite.

    One fused reduction and a single host sync, so training can afford it after every step. A
    sharded tensor (FSDP2's DTensor) is checked by this rank's shard: ranks agree on the answer.
    """
    tensors = [local_part(t) for t in tensors]
    flags = [_finite(t) for t in tensors if t.is_floating_point()]
    if not flags:
        return None
    device = flags[0].device
    ok = torch.stack([f.to(device) for f in flags])
    if bool(ok.all()):
        return None
    floats = [i for i, t in enumerate(tensors) if t.is_floating_point()]
    return floats[int((~ok).nonzero()[0, 0])]


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


_CHUNK = 1 << 20  # elements checked at once: isfinite's temporaries (|t| and three masks, ~8 bytes an element)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """``t.isfinite().all()``; the float8 dtypes have no isfinite kernel, so they are read as float32 (exact).
    A large tensor is checked a chunk at a time: whole, a 1B model's embedding would add 2 GB of temporaries
    to the loading peak."""
    if t.numel() > _CHUNK and t.is_contiguous():
        return torch.stack([_finite(part) for part in t.reshape(-1).split(_CHUNK)]).all()
    if t.element_size() == 1:
        t = t.float()
    return t.isfinite().all()


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, advice: str = "") -> None:
    """Raise :class:`CheckpointError` naming the first tensor of ``tensors`` that holds NaN/Inf values.

    ``what`` says whose tensors they are (``model weights in DIR``); ``advice`` what to do about it.
    """
    names = list(tensors)
    bad = first_non_finite([tensors[n] for n in names])
    if bad is None:
        return
    raise CheckpointError(f"{what}: tensor {names[bad]} holds NaN/Inf values" + (f"; {advice}" if advice else ""))
