"""Map a transformers state dict onto one of our models' parameters, every key and shape checked."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import CheckpointError


def map_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], rename: Callable[[str], str | None],
                dtype: torch.dtype | None, what: str,
                transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{our name: tensor} for every parameter in ``expected``, from checkpoint ``state``.

    ``rename`` gives a checkpoint key's name in our model (None: a key to skip, such as a saved
    mask buffer); ``transform`` reshapes a tensor into our layout (GPT-2's Conv1D transposes).
    A wrong shape or dtype, a missing or an unexpected tensor is a CheckpointError naming it and
    ``what`` the checkpoint should have been, before anything is assigned to a model.
    """
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        name = rename(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if transform is not None:
            tensor = transform(name, tensor)
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, but config.json "
                                  f"implies {tuple(expected[name])}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"checkpoint tensor {key} has dtype {tensor.dtype}, expected floating point")
        mapped[name] = tensor.to(dtype or tensor.dtype).contiguous()
    missing = sorted(set(expected) - set(mapped))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"checkpoint does not match {what}: " + "; ".join(parts))
    return mapped
