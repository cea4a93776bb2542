"""The process group a run belongs to: one process, or one rank of a ``torchrun`` launch.

``torchrun`` starts one process per device and tells each, through the environment, who it is
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and where to meet the others (``MASTER_ADDR``/``PORT``).
:func:`join_world` reads that and joins the group on PyTorch's own backends: NCCL between CUDA
devices, gloo on CPU. Each rank's device is ``cuda:LOCAL_RANK`` (or the CPU). Without those
variables the run is one process and nothing distributed is touched.

Every rank runs the same loop; the few decisions that must be the same everywhere (stop now,
the batch's summed loss, a failure on one rank) go through :class:`World`'s small collectives, so
no rank waits for a collective that another will never join.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError, LoratuneError

log = logging.getLogger("loratune")

DEFAULT_TIMEOUT_S = 600
"""How long a collective waits for a rank that does not come (``LORATUNE_DIST_TIMEOUT`` overrides): the
bound on a hang when a rank is stuck rather than dead (torchrun stops the others at once when one exits)."""


def dist_timeout() -> float:
    """Seconds a collective waits: ``LORATUNE_DIST_TIMEOUT`` if set (a positive, finite number), else the default."""
    text = os.environ.get("LORATUNE_DIST_TIMEOUT")
    if text is None or not text.strip():
        return float(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= 10**7):
        raise ConfigError(f"LORATUNE_DIST_TIMEOUT={text!r}: give the seconds a rank may wait for the others, a "
                          f"number > 0 (default {DEFAULT_TIMEOUT_S}), or unset it")
    return seconds


class LostRank(LoratuneError):
    """A collective failed: another rank died, was killed or timed out."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size`` (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False
    """Whether a process group is joined (torchrun, even with one process)."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, samples, plots and writes results."""
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """Each rank's device: ``cuda:LOCAL_RANK`` when the recipe asks for CUDA (or auto finds it), else CPU."""
        if not self.distributed:
            raise ValueError("World.device is for ranks of a launch; single runs pick their device from the recipe")
        wants_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
        if wants_cuda:
            if not torch.cuda.is_available():
                raise ConfigError(f"device={requested!r}, but no CUDA GPU is available on this node")
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"rank {self.rank} has LOCAL_RANK {self.local_rank}, but this node has "
                                  f"{torch.cuda.device_count()} GPU(s): lower --nproc-per-node")
            return torch.device("cuda", self.local_rank)
        if requested not in ("auto", "cpu"):
            raise ConfigError(f"device={requested!r} is not supported in a distributed run: use cuda or cpu")
        return torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64), for losses and token counts."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        self._collective(dist.all_reduce, t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any: how the ranks agree to stop."""
        return bool(self.sum([float(flag)])[0] > 0) if self.distributed else flag

    def barrier(self) -> None:
        if self.distributed:
            self._collective(dist.barrier)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        self._collective(dist.broadcast, t, 0)
        return int(t.item())

    def _comm_device(self) -> torch.device:
        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _collective(self, fn, *args) -> None:
        try:
            fn(*args)
        except RuntimeError as exc:  # DistError included
            raise lost_rank(self, exc) from None


SINGLE = World()
"""A run without torchrun."""


def lost_rank(world: World, exc: BaseException) -> LostRank:
    """The error a rank reports when a collective fails because another rank is gone."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LostRank(f"rank {world.rank} of {world.size}: lost contact with the other ranks ({first[:200]}); "
                    "a rank died, was killed or is stuck. The run stops here; its last complete checkpoint resumes "
                    "with the same torchrun command and --resume")


def agree(world: World, fn, what: str, main_only: bool = False):
    """``fn()`` on every rank (or rank 0 alone), its failure made everyone's: a rank whose ``fn`` raised
    raises that error, the others a :class:`LostRank` saying which step of the run failed elsewhere.
    ``fn`` must hold no collective (a rank that failed would never join it). Returns ``fn``'s result
    (None on the ranks that did not run it)."""
    result, error = None, None
    if world.main or not main_only:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    if world.any(error is not None):
        if error is not None:
            raise error
        raise LostRank(f"rank {world.rank} of {world.size}: another rank failed while {what} (its message says "
                       "why); stopping")
    return result


_COMM_FAILURE = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out", "timeout",
                 "socket", "peer")


@contextlib.contextmanager
def rank_failures(world: World) -> Iterator[None]:
    """Turn the error a collective raises when another rank has gone (DDP's all-reduce inside backward,
    FSDP2's gathers, a checkpoint) into a :class:`LostRank` that says so and what to do."""
    try:
        yield
    except LoratuneError:
        raise
    except RuntimeError as exc:  # torch's DistError is one (and torch builds without distributed lack it)
        text = str(exc).lower()
        dist_error = getattr(dist, "DistError", ())
        if world.distributed and (isinstance(exc, dist_error) or any(k in text for k in _COMM_FAILURE)):
            raise lost_rank(world, exc) from None
        raise


def launched() -> bool:
    """Whether torchrun (or another launcher setting RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_world(requested_device: str = "auto") -> World:
    """Join torchrun's process group (NCCL for CUDA ranks, gloo otherwise); SINGLE when not launched."""
    if not launched():
        return SINGLE
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    world = World(rank, size, local, distributed=True)
    _check_torch()
    device = world.device(requested_device)
    if dist.is_initialized():
        return world
    timeout = datetime.timedelta(seconds=dist_timeout())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    if not world.main:
        log.setLevel(logging.WARNING)  # rank 0 tells the story; the others speak up only when something is wrong
    return world


def _check_torch() -> None:
    """Launched runs need FSDP2's public API and DCP's safetensors storage (loratune is tested with torch 2.13)."""
    if not dist.is_available():
        raise ConfigError(f"this torch build ({torch.__version__}) has no torch.distributed: install a standard build")
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # noqa: F401

        dcp.HuggingFaceStorageWriter  # noqa: B018
    except (ImportError, AttributeError):
        raise ConfigError(f"torch {torch.__version__} lacks FSDP2's fully_shard or DCP's safetensors storage, which "
                          "runs under torchrun need: install a newer torch (loratune is tested with 2.13)") from None


def leave_world(world: World) -> None:
    """Leave the process group (the end of a run, or its failure)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
