"""Data parallelism on PyTorch's engines: DDP (every rank holds the model) or FSDP2 (``fully_shard``:
every rank holds 1/N of each parameter, its gradient and its optimizer state).

What the ranks run is :class:`~loratune.train.loss.CausalLMLoss` (the model and its loss as one
module), so DDP's and FSDP2's hooks see every forward. With FSDP2 each decoder block is its own
unit (gathered for its forward and backward, then freed) and the rest (embeddings, final norm,
head) the root unit, which stays gathered from a step's forward through its backward. LoRA and full fine-tuning shard alike: FSDP2 shards per parameter, so frozen
and trainable weights share a unit. A quantized base (NF4/int8 buffers) is not sharded: every
rank keeps the whole 4-bit base and FSDP2 shards the adapter.

Equal to one process: each rank takes its rows of the global batch (:func:`shard_batch`), divides
its summed loss by the *global* count of target tokens and multiplies by the world size (DDP and
FSDP2 average gradients over ranks), so the all-reduced gradient is the one-process gradient. DDP
all-reduces once per step (the last micro-batch); FSDP2 reduce-scatters after every micro-batch, so that
only the shards of the gradients are kept.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..data.examples import IGNORE_INDEX
from ..errors import ConfigError
from .world import World

STRATEGIES = ("ddp", "fsdp")
"""How the ranks share the model: DDP (each holds it whole) or FSDP2 (each holds 1/N of every parameter)."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (its longest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of blocks to shard: use strategy: ddp")
    return max(lists, key=len)


def wrap(module: nn.Module, strategy: str, world: World, device: torch.device) -> nn.Module:
    """``module`` under DDP or FSDP2 for ``world`` (returned as is for a single process)."""
    if not world.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        with warnings.catch_warnings():  # torch 2.13 renames it; the old name works on every version
            warnings.simplefilter("ignore", FutureWarning)
            # no buffer sync per forward: the models' buffers are constants (rotary tables, masks, quantized weights)
            return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(device.type, (world.size,))
        for block in decoder_blocks(module):
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        register_fsdp_forward_method(module, "run")  # generation: the root gathered around the model's methods
        return module
    raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


def run_on_model(trainer: nn.Module, fn, *args):
    """``fn(model, *args)`` for work outside the training forward (generation calls the model's methods):
    through the loss module's ``run``, so that under FSDP2 every rank gathers the root unit (embeddings,
    final norm, head) around it (the blocks gather themselves when called). ``trainer`` may be the bare
    model (a single process), DDP or FSDP2 around :class:`~loratune.train.loss.CausalLMLoss`."""
    module = getattr(trainer, "module", trainer) if type(trainer).__name__ == "DistributedDataParallel" else trainer
    return module.run(fn, *args) if hasattr(module, "run") else fn(module, *args)


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 unit (by its methods: no import, so torch builds without
    torch.distributed train in one process)."""
    return hasattr(module, "set_requires_gradient_sync") and hasattr(module, "reshard")


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Let this backward all-reduce gradients (the last micro-batch) or, under DDP, keep them local (the
    others). FSDP2 reduce-scatters every micro-batch: skipping it would keep every gradient whole on
    every rank until the last one, which is what sharding is there to avoid."""
    if enabled or not hasattr(module, "no_sync"):
        yield
    else:
        with module.no_sync():  # DDP
            yield


def shard_rows(batch: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """This rank's rows (pairs, prompts: the first dim of every tensor) of a global batch, in contiguous slices;
    the rows must divide evenly (a made-up row would change a preference or group loss)."""
    if world.size == 1:
        return batch
    rows = next(iter(batch.values())).shape[0]
    if rows % world.size:
        raise ConfigError(f"batch_size={rows} does not divide among {world.size} processes: this objective needs "
                          f"every rank to hold whole rows; use a batch_size that is a multiple of {world.size}")
    per = rows // world.size
    return {k: v[world.rank * per:(world.rank + 1) * per] for k, v in batch.items()}


def shard_batch(batch: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch: contiguous slices of ceil(B / N) rows, the last ones made up
    with copies of row 0 whose labels are all ignored, so every rank runs the same number of micro-batches
    (FSDP2 gathers in every forward) and the made-up rows add nothing to the loss or the gradients."""
    if world.size == 1:
        return batch
    rows = batch["input_ids"].shape[0]
    per = -(-rows // world.size)
    start, stop = min(world.rank * per, rows), min((world.rank + 1) * per, rows)
    mine = {k: v[start:stop] for k, v in batch.items()}
    short = per - (stop - start)
    if short:
        filler = {k: v[:1].expand(short, *v.shape[1:]) for k, v in batch.items()}
        filler["labels"] = torch.full_like(filler["labels"], IGNORE_INDEX)
        mine = {k: torch.cat([mine[k], filler[k]]) for k in batch}
    return mine
