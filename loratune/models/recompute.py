"""Activation recompute (the recipe's ``activation_checkpointing``): recompute each transformer block in
the backward pass instead of keeping its activations, and optionally keep the blocks' inputs in CPU
memory (CUDA only). Named "recompute" in the code: a "checkpoint" in loratune is a training snapshot.

A training step normally keeps, per block and token, every tensor autograd saves (tens of hidden
widths, see the families' memory profiles); with recompute it keeps only each block's input and
recomputes one block at a time while backpropagating through it: less activation memory for about
one more forward pass through the blocks. The peak memory and time it gives, measured with and
without it, are in benchmarks/results/checkpointing.json (benchmarks/bench_checkpointing.py).

Why ``use_reentrant=False``: with LoRA the base is frozen, so the embedding output that enters the
first block does not require grad. The reentrant checkpoint runs the block under ``no_grad`` and
hooks its backward to the *inputs'* autograd graph; when no input requires grad its output does
not either, so nothing flows back and the LoRA weights inside get no gradient (transformers works
around it with ``enable_input_require_grads``). The non-reentrant variant records the block's
graph as usual and only swaps what it saves for a recomputation, so parameters inside get their
gradients whatever the inputs (tests/models/test_recompute.py shows both). The CPU and CUDA
RNG states are restored for the recomputation, so dropout (GPT-2's, LoRA's) draws the same masks.

Recompute applies only while training with gradients on and without a KV cache: evaluation,
``no_grad`` and generation run the plain loop.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _recompute_in_backward  # torch's name for it

from ..errors import ConfigError

log = logging.getLogger("loratune")


def set_activation_checkpointing(model: nn.Module, enabled: bool = True, offload: bool = False,
                                 device: torch.device | str | None = None) -> None:
    """Switch block recomputation (and the CPU offload of the blocks' inputs) on or off for ``model``.

    ``model`` must be one of ours (it has an ``activation_checkpointing`` attribute its forward
    reads). ``offload`` needs ``enabled`` (alone it would copy every saved tensor, frozen weights
    included, to the host each step); on a device other than CUDA the activations already live in
    host memory, so it is ignored with a warning rather than refused: the same recipe runs on a
    laptop and on a GPU.
    """
    if not hasattr(model, "activation_checkpointing"):
        raise ConfigError(f"{type(model).__name__} does not support activation checkpointing: use a model loaded "
                          "by loratune (load_model)")
    if offload and not enabled:
        raise ConfigError("activation_offload moves the recomputed blocks' inputs to CPU memory: set "
                          "activation_checkpointing: true too")
    where = torch.device(device) if device is not None else next(model.parameters()).device
    if offload and where.type != "cuda":
        log.warning(f"activation_offload: ignored on {where.type} (the activations are already in host memory)")
        offload = False
    model.activation_checkpointing, model.activation_offload = bool(enabled), bool(offload)


def block_policy(model: nn.Module, cache: Any | None) -> dict[str, bool]:
    """``run_layers``' flags for this forward: the model's settings while training with gradients
    enabled and no KV cache, all off otherwise (evaluation, ``no_grad``, generation)."""
    on = model.training and torch.is_grad_enabled() and cache is None
    return dict(recompute=on and model.activation_checkpointing, offload=on and model.activation_offload)


def run_layers(layers: Iterable[nn.Module], x: torch.Tensor, *args: Any, recompute: bool = False,
               offload: bool = False) -> torch.Tensor:
    """``x = layer(x, *args)`` for each layer; with ``recompute``, each call recomputed in backward.

    ``args`` (rotary tables, masks, the cache) are the same for every layer. ``offload`` (CUDA
    tensors only, with ``recompute``) keeps each block's saved input in pinned host memory until
    its recomputation copies it back.
    """
    if not recompute:
        for layer in layers:
            x = layer(x, *args)
        return x
    hooks = torch.autograd.graph.saved_tensors_hooks(_to_host, _to_device) if offload and x.is_cuda else nullcontext()
    with hooks:  # outside the recomputed calls, it sees exactly what they save: each block's tensor arguments
        for layer in layers:
            x = _recompute_in_backward(layer, x, *args, use_reentrant=False, preserve_rng_state=True)  # (B, T, C)
    return x


def _to_host(tensor: torch.Tensor) -> Any:
    if tensor.device.type != "cuda" or not tensor.is_floating_point():  # masks are small: they stay
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)  # ordered on the stream before the GPU block can be reused
    return tensor.device, host


def _to_device(saved: Any) -> torch.Tensor:
    if isinstance(saved, torch.Tensor):
        return saved
    device, host = saved
    return host.to(device, non_blocking=True)
