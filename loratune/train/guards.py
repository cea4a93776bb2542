"""Resource guards: refuse a run that cannot fit before it starts, and say so when the disk fills.

:func:`estimate_training_memory` adds up what one training step holds, by kind
(:class:`MemoryEstimate`); :func:`check_resources` compares it with the memory this process may
still use and the output directory's free space, and refuses with the numbers and the recipe
changes that would fit. :func:`disk_error` turns an ``OSError`` raised while saving into an
error that names what was kept and what to do.

Activations: for ``N = B * T`` tokens and ``a`` bytes per activation element (4 in fp32, 2 in
bf16), each block holds ``N * s * a`` bytes for the backward pass, where ``s`` is the family's
``MemoryProfile.saved_per_token_per_block``: what a block adds to the peak resident memory per
token with LoRA on the default targets (q, v), the tensors autograd saves (counted as Korthikanti
et al., 2022, "Reducing activation recomputation", do, without the attention scores: SDPA's
fused kernels keep only the output and a log-sum-exp per row) and what the allocator keeps of
the freed temporaries between them (for GPT-2, 9C + 2F = 17C, see ``models/gpt2.py``; the
Llama-style families calibrate theirs, see ``models/decoder_family.py``). Where CPU training
takes the batched-matmul attention (T <= 128) its softmax probabilities add N heads T (4 + a).
Each LoRA layer adds its rank-r projection ``N r a`` and, with LoRA dropout, the dropped copy of
its input and the mask, ``N in (a + 1)``; each one the default targets do not name (k, o, the
MLP's...) also an output-wide ``N out a`` (its kept input and the allocator's share of its
update, as measured). Outside the blocks, ``saved_per_token_outside`` per token (last block
output, final norm, the loss's saved gradient for the hidden states).

With activation checkpointing (models/recompute.py) a block keeps only its input for the
backward pass, ``N C`` elements in the residual stream's dtype (float32 under bf16-mixed's
autocast), none on the device with CUDA offload; one block's tensors (its share above, adapters
included) live again while it is recomputed. On CPU, glibc's heap keeps about a quarter of each
block's freed temporaries besides (the forward frees them between the kept inputs, and later
allocations do not fill the holes: measured by benchmarks/bench_checkpointing.py, where the live
bytes matched the other terms with glibc's mmap threshold pinned at 1 MiB).

Workspace, the larger of two moments. While the loss runs: the fused loss (loratune/train/loss.py)
never holds the (N, V) logits, only one chunk of ``R = min(N, chunk)`` rows
(``loss.default_chunk``: ~32 MiB of float32 logits on CPU, 1,024 rows when the head trains),
twice at its peak (the float32 logits and their log-softmax; low-precision logits are upcast
first, so they add ``a`` bytes more), and the previous chunk too where there are several and
the allocator keeps their blocks (not on CPU for chunks of 32 MiB and more, which glibc maps
and unmaps each time): (8 or 12, + a) R V bytes; plus the gradients in flight
(``backward_per_token``) and, when the head trains, the loss's float32 accumulator of its
gradient. After the activations are freed: AdamW's update temporaries (on CPU, torch's AdamW
and KahanAdamW update one tensor at a time: the largest one's float32 temporaries; with CUDA's
foreach kernels one per trainable element) and, for a trained head tied to the embedding, its
gradient arriving a second time and the sum (two more head-sized float32 tensors: bf16 ones pass
through float32 on the way); that moment's excess over the activations. AdamW keeps two float32 moments per trainable element (plus a
Kahan compensation in the weight's dtype for weights stored in bf16). The estimate is for one
micro-batch (``batch_size / grad_accum`` sequences) at the full ``seq_len``, and for the steady
state (from the second step on, when the moments exist during the backward pass);
tests/train/test_guards.py and test_guards_families.py measure it against the peak resident
memory of real steps, benchmarks/guard_accuracy.py for published shapes of every family.

Setting a QLoRA run up has its own peak (:func:`estimate_setup_memory`, logged by check_resources): the
base is quantized while it loads (quant/load.py), so the quantized base, the float tensors, and one
projection's float weight with the quantizer's temporaries (or the largest float tensor widened to the
training dtype); tests/train/test_guards.py and benchmarks/bench_qlora_load.py measure it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.lora import LoRAConfig, LoRALinear, lora_layers
from ..adapters.targets import model_aliases, suffix_match
from ..errors import CheckpointError, LoratuneError, ResourceError
from ..models.attention import MATMUL_MAX_T
from ..models.registry import family_of
from ..quant.model import load_dtype
from ..runtime.device import available_memory
from .loss import default_chunk
from .metrics import human_bytes

log = logging.getLogger("loratune")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
MMAP_MAX = 32 * 2**20
"""glibc's largest mmap threshold on 64-bit: allocations at least this large are always mapped, and freed to the OS."""
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
    """Transient peak: the loss's logits chunk and the gradients in flight, or what AdamW's step (and a tied
    head's second gradient) needs beyond the freed activations."""

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
                             finetune: str | None = None, checkpointing: bool | None = None) -> MemoryEstimate:
    """What a training step of ``model`` (one of ours, LoRA injected and trainability set) needs.

    ``precision`` decides the dtypes (bf16-true stores frozen weights, and with ``finetune ==
    'full'`` every weight, in bf16; LoRA masters stay fp32), so the estimate for another
    precision can be asked of the same model; ``checkpointing`` (None: as the model is set, see
    models/recompute.py) likewise. The shapes come from the family's memory profile; the
    formula is in the module docstring.
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
    stored_q, largest_q = _quantized_storage(model)
    weights = sum(p.numel() * stored(p) for p in params) + stored_q + largest_q * a  # + one dequantized at a time
    gradients = sum(p.numel() * stored(p) for p in trainable)
    # AdamW's two float32 moments; weights kept in bf16 add Kahan compensation in their own dtype
    optimizer = sum(p.numel() * (8 + (stored(p) if stored(p) < 4 else 0)) for p in trainable)
    if checkpointing is None:
        checkpointing = getattr(model, "activation_checkpointing", False)
    offload = checkpointing and getattr(model, "activation_offload", False)
    resid = 2 if precision == "bf16-true" else 4  # the residual stream: float32 under autocast
    activations = _activations(model, prof, micro_batch * seq_len, seq_len, a, low)
    if checkpointing:
        cpu = model.lm_head.weight.device.type == "cpu"
        activations = _checkpointed(prof, activations, micro_batch * seq_len, a, resid, offload, cpu)
    head = model.lm_head.weight
    N, V, C = micro_batch * seq_len, prof.vocab, prof.hidden
    chunk = default_chunk(head.device, V, head.requires_grad)
    rows = min(N, chunk)
    # fp32 logits + their log-softmax, low-precision logits (upcast first) too, and the previous chunk where
    # its blocks stay with the allocator (on CPU glibc maps and unmaps those of 32 MiB and more each time)
    previous = N > chunk and (head.device.type != "cpu" or rows * V * 4 < MMAP_MAX)
    loss_chunk = ((2 + previous) * 4 + (a if low else 0)) * rows * V
    head_grad = V * C * 4 if head.requires_grad else 0  # the fused loss's fp32 accumulator
    backward = N * prof.backward_per_token * a
    # the activations are gone when AdamW's step (or a tied head's second gradient) needs its room
    later = _optimizer_peak(model, trainable, stored)
    workspace = max(loss_chunk + backward + head_grad, later - activations)
    return MemoryEstimate(weights, gradients, optimizer, activations, workspace)


def _optimizer_peak(model: nn.Module, trainable: list[nn.Parameter], stored) -> int:
    """Transient bytes after the activations are freed: AdamW's update temporaries, and a tied head's
    gradient arriving twice (from the loss and from the embedding) and summed (module docstring)."""
    head = model.lm_head.weight
    if head.device.type == "cpu":  # torch's AdamW and KahanAdamW update one tensor at a time: the largest's
        temps = max((p.numel() * (4 if stored(p) == 4 else 8) for p in trainable), default=0)  # fp32 temporaries
    else:  # foreach kernels: one temporary per trainable element at once
        temps = sum(p.numel() for p in trainable) * 4
    tied = sum(1 for m in model.modules() for p in m.parameters(recurse=False) if p is head) > 1
    return temps + (2 * head.numel() * 4 if tied and head.requires_grad else 0)  # float32 on their way, bf16 too


def _activations(model: nn.Module, prof, N: int, seq_len: int, a: int, low: bool) -> int:
    """Bytes autograd keeps for the backward pass of N tokens (module docstring)."""
    per_block = N * prof.saved_per_token_per_block * a
    if model.lm_head.weight.device.type == "cpu" and seq_len <= MATMUL_MAX_T:  # matmul attention keeps its
        per_block += N * prof.n_head * seq_len * (4 + (a if low else 0))  # fp32 softmax (+ low-precision copy)
    lora = 0
    baseline = _default_lora_modules(model)
    for name, layer in lora_layers(model):
        for u in (layer.lora[n] for n in layer.present()):
            lora += N * u.r * len(u.slices) * a
            if isinstance(u.dropout, nn.Dropout):
                lora += N * layer.in_features * (a + 1)
        if name not in baseline:  # its input, kept for A's gradient, and its output-wide update
            lora += N * layer.out_features * a
    return prof.n_layer * per_block + lora + N * prof.saved_per_token_outside * a


def _checkpointed(prof, activations: int, N: int, a: int, resid: int, offload: bool, cpu: bool) -> int:
    """The activations with each block recomputed in backward: every block's input (in host memory
    with offload), one block's saved tensors at a time, what is kept outside the blocks, and on CPU
    the heap's share of each block's freed temporaries (module docstring)."""
    outside = N * prof.saved_per_token_outside * a
    one_block = -(-(activations - outside) // prof.n_layer)  # the blocks' share, adapters included, per block
    inputs = 0 if offload else prof.n_layer * N * prof.hidden * resid
    heap = prof.n_layer * one_block // 4 if cpu else 0
    return inputs + one_block + outside + heap


def _default_lora_modules(model: nn.Module) -> set[str]:
    """The projections LoRA's default targets (q, v) adapt: the memory profile is measured with those."""
    aliases = model_aliases(model)
    suffixes = [aliases[t].module for t in LoRAConfig().targets if t in aliases]
    return {name for name, _ in lora_layers(model) if any(suffix_match(name, s) for s in suffixes)}


# --- what is available: available_memory (runtime/device.py); the disk ----------------------

def free_disk(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# --- the checks --------------------------------------------------------------------------------

def check_resources(model: nn.Module, recipe, device: torch.device, out_dir: Path, shards: int = 1,
                    objective=None) -> MemoryEstimate:
    """Refuse a run that will not fit in memory or on disk, before its first step; returns the estimate.

    Memory: the estimate must fit in what is available now plus what the model already holds
    (it is loaded when this runs). Disk: ``keep_checkpoints + 1`` checkpoints (one being
    written while the others are kept) and the result must fit in the output directory.
    ``shards``: the ranks of an FSDP2 run, over which the parameters, their gradients and optimizer
    state are divided, except the root unit's (embeddings, final norm, head: gathered from a step's
    forward through its backward) and quantized weights (buffers, not sharded). The model is loaded on
    the CPU then, so none of it is resident on ``device`` yet. ``objective`` (None: sft) runs
    ``sequences_per_row`` sequences a row (a preference pair's two, a GRPO group) and holds its
    ``extra_memory`` besides (the logits it scores, GRPO's rollout cache).
    """
    mb, seq = recipe.micro_batch_size, recipe.seq_len
    per_row = objective.sequences_per_row() if objective is not None else 1
    longest = objective.sequence_len(seq) if objective is not None else seq
    est = estimate_training_memory(model, mb * per_row, longest, recipe.precision, recipe.finetune,
                                   recipe.activation_checkpointing)
    if objective is not None and objective.extra_memory(model, mb, seq):
        est = dataclasses.replace(est, workspace=est.workspace + objective.extra_memory(model, mb, seq))
    if shards > 1:
        est = _sharded(est, model, shards)
    available = available_memory(device)
    if available is not None:
        resident = sum(p.numel() * p.element_size() for p in model.parameters()) + _quantized_storage(model)[0]
        resident = resident if next(model.parameters()).device.type == device.type else 0
        budget = available + resident
        log.info(f"memory estimate: {est}; available: {human_bytes(budget)} on {device}")
        if recipe.quantize != "none":
            setup = estimate_setup_memory(model, _load_bytes(recipe), recipe.quantize)
            log.info(f"QLoRA setup peak (quantized while loading), estimated: {human_bytes(setup)}")
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


def _load_bytes(recipe) -> int:
    """Bytes per element of the dtype a QLoRA base is read in before quantizing (quant.model.load_dtype)."""
    train = torch.bfloat16 if recipe.precision == "bf16-true" else torch.float32
    return load_dtype(recipe.model, train).itemsize


def _sharded(est: MemoryEstimate, model: nn.Module, shards: int) -> MemoryEstimate:
    """What one FSDP2 rank holds of ``est`` (see check_resources)."""
    from ..dist.parallel import decoder_blocks

    in_blocks = {id(p) for p in decoder_blocks(model).parameters()}
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    quantized = _quantized_storage(model)[0]
    return dataclasses.replace(est, weights=-(-(est.weights - quantized) // shards) + quantized + root,
                               gradients=-(-est.gradients // shards), optimizer=-(-est.optimizer // shards))


def _nf4_saving(model: nn.Module, recipe) -> int:
    """Bytes ``quantize: nf4`` would save on a LoRA run not yet quantized: every projection but the head
    from its stored size to ~4.13 bits (4.127 with double quantization)."""
    if recipe.finetune != "lora" or recipe.quantize != "none":
        return 0
    size = 2 if recipe.precision == "bf16-true" else 4
    head = model.lm_head.weight
    frozen = [m.weight for m in model.modules()
              if isinstance(m, (nn.Linear, LoRALinear)) and m.weight is not None and m.weight is not head]
    return int(sum(w.numel() for w in frozen) * (size - 4.13 / 8))


QUANTIZER_TEMPORARIES = 9
"""Bytes per element that quantizing one float32 weight allocates besides it (NF4: the scaled copy, its clamp,
the int32 then uint8 codes; int8 about the same): measured 8.9-9.0 on CPU for an 8192 x 2048 weight."""


def estimate_setup_memory(model: nn.Module, load_bytes: int, kind: str = "nf4") -> int:
    """The peak resident memory of setting up ``model`` as setup_model did (a QLoRA base quantized while
    loading, :mod:`loratune.quant.load`), from the model it left: the quantized storage and every float
    parameter (unquantized base and adapters, in their final dtypes) plus the larger of two moments --
    quantizing the largest projection (its float weight in the ``load_bytes`` dtype it was read in, a
    float32 copy when that is narrower, and :data:`QUANTIZER_TEMPORARIES`; ``gguf``: the blocks decoded once
    to float32 for the finite check) or widening the largest unquantized tensor to its training dtype after
    loading (its ``load_bytes`` copy beside it). Without quantization: the weights alone."""
    params = {id(p): p for p in model.parameters()}.values()
    floats = sum(p.numel() * p.element_size() for p in params)
    stored_q, largest_q = _quantized_storage(model)
    if not stored_q:
        return floats
    if kind == "gguf":
        quantizing = largest_q * 4 * 2  # the decoded float32 weight and the decoder's float32 temporaries
    else:
        quantizing = largest_q * (load_bytes + (4 if load_bytes < 4 else 0) + QUANTIZER_TEMPORARIES)
    widened = [p for p in params if not p.requires_grad and p.element_size() > load_bytes]
    casting = max((p.numel() * load_bytes for p in widened), default=0)
    return stored_q + floats + max(quantizing, casting)


def _quantized_storage(model: nn.Module) -> tuple[int, int]:
    """(bytes a quantized base holds: codes, scales, biases; elements of its largest weight, which forward and
    backward dequantize one layer at a time) -- (0, 0) without quantization."""
    layers = [m for m in model.modules() if getattr(m, "is_quantized", False)]
    stored = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    return stored, max((m.in_features * m.out_features for m in layers), default=0)


def _suggestions(model: nn.Module, recipe, budget: int) -> str:
    """Recipe changes (each alone) that bring the estimate under ``budget``, best first."""
    on = recipe.activation_checkpointing

    def fits(micro_batch: int, seq_len: int, precision: str, checkpointing: bool = on) -> bool:
        est = estimate_training_memory(model, micro_batch, seq_len, precision, recipe.finetune, checkpointing)
        return est.total <= budget

    mb, seq, bs = recipe.micro_batch_size, recipe.seq_len, recipe.batch_size
    tips = []
    for accum in range(recipe.grad_accum + 1, bs + 1):
        if bs % accum == 0 and fits(bs // accum, seq, recipe.precision):
            tips.append(f"--set grad_accum={accum} (micro-batches of {bs // accum}; the same result, more time)")
            break
    if not on and fits(mb, seq, recipe.precision, checkpointing=True):
        tips.append("--set activation_checkpointing=true (each block recomputed in the backward pass; the same "
                    "result, ~30% more compute)")
    for precision in ("bf16-true", "bf16-mixed"):
        if precision != recipe.precision and fits(mb, seq, precision):
            tips.append(f"--set precision={precision}")
            break
    shorter = seq // 2
    while shorter >= 16 and not fits(mb, shorter, recipe.precision):
        shorter //= 2
    if shorter >= 16:
        tips.append(f"--set seq_len={shorter}")
    saved = _nf4_saving(model, recipe)
    current = estimate_training_memory(model, mb, seq, recipe.precision, recipe.finetune, on).total
    if saved and current - saved <= budget:
        tips.append(f"--set quantize=nf4 (QLoRA: the frozen projections in 4 bits, about {human_bytes(saved)} less)")
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
