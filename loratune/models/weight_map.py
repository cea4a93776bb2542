"""Map a transformers state dict onto one of our models' parameters, every key and shape checked.

The state may be lazy (:class:`~loratune.hub.files.LazyStateDict`: each tensor read when looked up):
the keys are checked first, then each tensor is read, converted and placed before the next is read.
A ``linear_hook`` (QLoRA's quantize-while-loading, :mod:`loratune.quant.load`) takes the weights of the
linear projections as they arrive and returns what stands for each: a quantized module, so that the
float copy is freed before the next tensor is read, or the tensor itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Union

import torch
from torch import nn

from ..errors import CheckpointError

LinearHook = Callable[[str, Callable[[], torch.Tensor], tuple[int, ...]], Union[torch.Tensor, nn.Module]]
"""(weight name in our model, a function that reads that weight -- (out, in), the load dtype, shape checked;
callable again later, reading it again --, its expected shape) -> the module to stand for the projection
(without its bias: the loader gives it the bias), or the float tensor to keep."""


def map_weights(state: Mapping[str, torch.Tensor], expected: dict[str, torch.Size],
                rename: Callable[[str], str | None], dtype: torch.dtype | None, what: str,
                transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                linear_hook: LinearHook | None = None,
                linears: frozenset[str] = frozenset()) -> dict[str, torch.Tensor | nn.Module]:
    """{our name: tensor} for every parameter in ``expected``, from checkpoint ``state``.

    ``rename`` gives a checkpoint key's name in our model (None: a key to skip, such as a saved
    mask buffer); ``transform`` reshapes a tensor into our layout (GPT-2's Conv1D transposes).
    A missing or an unexpected tensor is a CheckpointError naming it and ``what`` the checkpoint
    should have been, before any tensor is read; a wrong shape or dtype when that tensor is read,
    before anything is assigned to a model. The weights named in ``linears`` go through
    ``linear_hook`` when one is given, and its result takes their place (see :data:`LinearHook`).
    """
    names: dict[str, str] = {}  # checkpoint key -> our name
    unexpected = []
    for key in state:
        name = rename(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
        else:
            names[key] = name
    missing = sorted(set(expected) - set(names.values()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"checkpoint does not match {what}: " + "; ".join(parts))

    def read(key: str, name: str) -> torch.Tensor:
        tensor = state[key]
        if transform is not None:
            tensor = transform(name, tensor)
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, but config.json "
                                  f"implies {tuple(expected[name])}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"checkpoint tensor {key} has dtype {tensor.dtype}, expected floating point")
        return tensor.to(dtype or tensor.dtype).contiguous()

    mapped: dict[str, torch.Tensor | nn.Module] = {}
    for key, name in names.items():  # in the file's order: one pass through it
        if linear_hook is not None and name in linears:
            mapped[name] = linear_hook(name, lambda key=key, name=name: read(key, name), tuple(expected[name]))
        else:
            mapped[name] = read(key, name)
    return mapped


def linear_weights(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> frozenset[str]:
    """The weight names of ``model``'s ``nn.Linear`` projections (those a linear hook is offered)."""
    return frozenset(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skip(n))


def assign_weights(model: nn.Module, mapped: dict[str, torch.Tensor | nn.Module]) -> None:
    """Put ``mapped`` (what :func:`map_weights` returned, every name checked) into ``model`` built on the meta
    device: tensors as its parameters (no copy), a module a linear hook returned in place of its projection,
    given the projection's bias."""
    tensors = {}
    for name, value in mapped.items():
        if isinstance(value, nn.Module):
            path = name.removesuffix(".weight")
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, value)
    for name, value in mapped.items():
        if isinstance(value, nn.Module):
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf == "bias" and isinstance(mapped.get(f"{owner}.weight"), nn.Module):
            module.bias = value  # the hook's module keeps its bias as it keeps a checkpoint's (a frozen buffer)
        else:
            tensors[name] = value
    result = model.load_state_dict(tensors, assign=True, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"internal: tensors with no place in the model: {', '.join(result.unexpected_keys[:3])}")
