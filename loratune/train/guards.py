"""Resource guards: refuse a run that cannot fit before it starts, and say so when the disk fills.

:func:`estimate_training_memory` adds up what one training step holds, by kind
(:class:`MemoryEstimate`); :func:`check_resources` compares it with the memory this process may
still use and the output directory's free space, and refuses with the numbers and the recipe
changes that would fit. :func:`disk_error` turns an ``OSError`` raised while saving into an
error that names what was kept and what to do.

Activations: for ``N = B * T`` tokens and ``a`` bytes per activation element (4 in fp32, 2 in
bf16), each block keeps ``N * s * a`` bytes for the backward pass, where ``s`` is the family's
``MemoryProfile.saved_per_token_per_block`` (the tensors autograd saves, counted as Korthikanti
et al., 2022, "Reducing activation recomputation", do, without the attention scores: SDPA's
fused kernels keep only the output and a log-sum-exp per row; for GPT-2, 9C + 2F = 17C, see
``models/gpt2.py``). Where CPU training takes the batched-matmul attention (T <= 128) its
softmax probabilities add N heads T (4 + a). Each LoRA layer adds its rank-r projection
``N r a`` and, with LoRA dropout, the dropped copy of its input and the mask, ``N in (a + 1)``.
Outside the blocks, ``saved_per_token_outside`` per token (last block output, final norm, the
loss's saved gradient for the hidden states). The fused loss (loratune/train/loss.py) never holds
the (N, V) logits: its workspace is one chunk of ``R = min(N, chunk)`` rows of fp32
log-probabilities (``loss.default_chunk``: ~32 MiB of them on CPU, 1,024 rows when the head
trains), held about twice at its peak (the low-precision logits and their float32 log-softmax),
and three times when there are several chunks: (2 or 3) R V 4 bytes. The backward pass adds
the gradients in flight (``backward_per_token``); AdamW keeps two float32 moments per trainable
element (plus a Kahan compensation in the weight's dtype for weights stored in bf16) and adds,
during its step, one temporary per trainable element. The estimate is for one micro-batch
(``batch_size / grad_accum`` sequences) at the full ``seq_len``; tests/train/test_guards.py
measures it against the peak resident memory of real fp32 steps.
"""

from __future__ import annotations

import errno
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.lora import lora_layers
from ..errors import CheckpointError, LoratuneError, ResourceError
from ..models.attention import MATMUL_MAX_T
from ..models.registry import family_of
from .loss import default_chunk
from .metrics import human_bytes

log = logging.getLogger("loratune")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
WARN_FRACTION = 0.8
"""Warn (but run) when the estimate uses more than this fraction of what is available."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step needs, by what holds them."""

    weights: int
    """All parameters (tied weights once), in the dtype the precision stores them."""
    gradients: int
    """One gradient per trainable parameter, in the parameter's dtype."""
    optimizer: int
    """AdamW's two moments per trainable parameter."""
    activations: int
    """Tensors saved for the backward pass, for one micro-batch at full seq_len (see module docstring)."""
    workspace: int
    """Transient peak: the loss's logits chunk and the backward's gradients in flight, or AdamW's temporaries."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace

    def parts(self) -> str:
        """'weights 1.2 GiB, gradients ...': the five parts, for messages."""
        return ", ".join(f"{name} {human_bytes(getattr(self, name))}"
                         for name in ("weights", "gradients", "optimizer", "activations", "workspace"))

    def __str__(self) -> str:
        return f"{human_bytes(self.total)} ({self.parts()})"


def estimate_training_memory(model: nn.Module, micro_batch: int, seq_len: int, precision: str = "fp32",
                             finetune: str | None = None) -> MemoryEstimate:
    """What a training step of ``model`` (one of ours, LoRA injected and trainability set) needs.

    ``precision`` decides the dtypes (bf16-true stores frozen weights, and with ``finetune ==
    'full'`` every weight, in bf16; LoRA masters stay fp32), so the estimate for another
    precision can be asked of the same model. The shapes come from the family's memory profile;
    the formula is in the module docstring.
    """
    found = family_of(model)
    if found is None:
        raise ResourceError(f"no memory profile for {type(model).__name__}: not a loratune model family")
    prof = found[0].memory_profile(found[1])
    params = list(model.parameters())  # shared (tied) tensors once
    full = finetune == "full" if finetune is not None else all(p.requires_grad for p in params)
    low = precision in ("bf16-mixed", "bf16-true")
    a = 2 if low else 4

    def stored(p: nn.Parameter) -> int:
        return 2 if precision == "bf16-true" and (full or not p.requires_grad) else p.element_size()

    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * stored(p) for p in params)
    gradients = sum(p.numel() * stored(p) for p in trainable)
    # AdamW's two float32 moments; weights kept in bf16 add Kahan compensation in their own dtype
    optimizer = sum(p.numel() * (8 + (stored(p) if stored(p) < 4 else 0)) for p in trainable)
    n_trainable = sum(p.numel() for p in trainable)
    activations = _activations(model, prof, micro_batch * seq_len, seq_len, a, low)
    head = model.lm_head.weight
    N, V, C = micro_batch * seq_len, prof.vocab, prof.hidden
    chunk = default_chunk(head.device, V, head.requires_grad)
    rows = min(N, chunk)
    loss_chunk = (2 + (N > chunk)) * rows * V * 4  # logits + their fp32 log-softmax (+ the previous chunk)
    head_grad = V * C * 4 if head.requires_grad else 0  # the fused loss's fp32 accumulator
    backward = N * prof.backward_per_token * a
    workspace = max(loss_chunk + backward + head_grad, n_trainable * 4)
    return MemoryEstimate(weights, gradients, optimizer, activations, workspace)


def _activations(model: nn.Module, prof, N: int, seq_len: int, a: int, low: bool) -> int:
    """Bytes autograd keeps for the backward pass of N tokens (module docstring)."""
    per_block = N * prof.saved_per_token_per_block * a
    if model.lm_head.weight.device.type == "cpu" and seq_len <= MATMUL_MAX_T:  # matmul attention keeps its
        per_block += N * prof.n_head * seq_len * (4 + (a if low else 0))  # fp32 softmax (+ low-precision copy)
    lora = 0
    for _, layer in lora_layers(model):
        lora += N * layer.r * len(layer.slices) * a
        if isinstance(layer.dropout, nn.Dropout):
            lora += N * layer.in_features * (a + 1)
    return prof.n_layer * per_block + lora + N * prof.saved_per_token_outside * a


# --- what is available -------------------------------------------------------------------------

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


def free_disk(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# --- the checks --------------------------------------------------------------------------------

def check_resources(model: nn.Module, recipe, device: torch.device, out_dir: Path) -> MemoryEstimate:
    """Refuse a run that will not fit in memory or on disk, before its first step; returns the estimate.

    Memory: the estimate must fit in what is available now plus what the model already holds
    (it is loaded when this runs). Disk: ``keep_checkpoints + 1`` checkpoints (one being
    written while the others are kept) and the result must fit in the output directory.
    """
    mb, seq = recipe.micro_batch_size, recipe.seq_len
    est = estimate_training_memory(model, mb, seq, recipe.precision, recipe.finetune)
    available = available_memory(device)
    if available is not None:
        resident = sum(p.numel() * p.element_size() for p in model.parameters())
        budget = available + resident
        log.info(f"memory estimate: {est}; available: {human_bytes(budget)} on {device}")
        if est.total > budget:
            raise ResourceError(
                f"this run needs about {human_bytes(est.total)} on {device} ({est.parts()}) for micro-batches of "
                f"{mb} x {seq} tokens, but only {human_bytes(budget)} is available. "
                + _suggestions(model, recipe, budget))
        if est.total > WARN_FRACTION * budget:
            log.warning(f"the run needs about {human_bytes(est.total)} of the {human_bytes(budget)} available "
                        f"on {device}: close to the limit")
    ckpt = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # + 2 moments
    result = est.weights if recipe.finetune == "full" else ckpt // 3
    needed = (recipe.keep_checkpoints + 1) * ckpt + result
    free = free_disk(out_dir)
    if needed > free:
        raise ResourceError(
            f"{out_dir} has {human_bytes(free)} free, but the run writes about {human_bytes(needed)} "
            f"({recipe.keep_checkpoints} kept checkpoint(s) and one being written, {human_bytes(ckpt)} each, "
            f"and the result): free some space, choose another --out, or lower keep_checkpoints")
    return est


def _suggestions(model: nn.Module, recipe, budget: int) -> str:
    """Recipe changes (each alone) that bring the estimate under ``budget``, best first."""
    def fits(micro_batch: int, seq_len: int, precision: str) -> bool:
        est = estimate_training_memory(model, micro_batch, seq_len, precision, recipe.finetune)
        return est.total <= budget

    mb, seq, bs = recipe.micro_batch_size, recipe.seq_len, recipe.batch_size
    tips = []
    for accum in range(recipe.grad_accum + 1, bs + 1):
        if bs % accum == 0 and fits(bs // accum, seq, recipe.precision):
            tips.append(f"--set grad_accum={accum} (micro-batches of {bs // accum}; the same result, more time)")
            break
    for precision in ("bf16-true", "bf16-mixed"):
        if precision != recipe.precision and fits(mb, seq, precision):
            tips.append(f"--set precision={precision}")
            break
    shorter = seq // 2
    while shorter >= 16 and not fits(mb, shorter, recipe.precision):
        shorter //= 2
    if shorter >= 16:
        tips.append(f"--set seq_len={shorter}")
    if recipe.finetune == "full":
        tips.append("--set finetune=lora (gradients and optimizer state for the adapter only)")
    if not tips:
        return "Nothing in the recipe brings it under the limit: use a machine with more memory or a smaller model."
    return "Try " + ", or ".join(tips) + "."


def disk_error(exc: OSError, what: str, kept: str) -> LoratuneError:
    """The error for an OSError while writing ``what``: a full disk gets its own message and advice.

    ``kept`` says what survived (e.g. the last complete checkpoint), so the user knows nothing
    more than the unfinished write was lost.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in DISK_FULL:
        return ResourceError(f"no space left on the device while writing {what} ({reason}); the unfinished "
                             f"write was removed and {kept}. Free some space (or lower keep_checkpoints, or "
                             "choose another --out) and continue with --resume")
    return CheckpointError(f"could not write {what} ({reason}); {kept}")
