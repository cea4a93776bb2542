"""The causal-LM loss: summed token cross-entropy, so micro-batches add up exactly.

The output head is fused with the cross-entropy and run over chunks of positions: the
(B*T, vocab) logits never exist at once (50,257 floats per position is most of GPT-2's
activation memory at long sequences). Each chunk's logits are made, turned into the loss and
into the gradients for the hidden states (and the head weight, when it trains), and freed;
the backward pass only scales those saved gradients.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100
CPU_CHUNK_BYTES = 32 * 2**20  # float32 logits per chunk on CPU: allocations past glibc's mmap threshold
# (32 MiB at most) come back as fresh pages every time, and the page faults cost more than the softmax
CPU_HEAD_GRAD_CHUNK = 1024  # when the head trains: its gradient (V x chunk) @ (chunk x C) needs a long inner
# dimension to run at matmul speed (at 160 positions it ran 3x slower than at 1024), which beats the page faults
CPU_MIN_CHUNK = 128  # ... but never fewer positions than this: at Qwen3's 151,936-token vocabulary the byte
# limit gives 48, and every chunk re-reads the whole head weight (311 MB in bf16): the loss of 512 positions took
# 2.29 s at 48 and 1.48 s at 160 (CPU seconds, one thread, benchmarks on a shared machine)
GPU_CHUNK = 2048  # positions per chunk on accelerators, whose caching allocator reuses the memory


def default_chunk(device: torch.device, vocab: int, head_trains: bool = False) -> int:
    """Positions per chunk: on CPU small enough to stay under the mmap threshold (unless the head
    trains, see CPU_HEAD_GRAD_CHUNK); large on GPUs."""
    if device.type != "cpu":
        return GPU_CHUNK
    if head_trains:
        return CPU_HEAD_GRAD_CHUNK
    return max(CPU_MIN_CHUNK, CPU_CHUNK_BYTES // (4 * vocab) // 16 * 16)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) over i with y_i != IGNORE, with gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                need_h: bool, need_w: bool, softcap: float | None) -> torch.Tensor:
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]  # (n, C)
            y = labels[start:start + chunk]  # (n,)
            valid = y != IGNORE
            n_valid = int(valid.sum())  # one host sync per chunk
            if n_valid == 0:
                continue
            z = h @ weight.t()  # (n, V), only this chunk
            capped = None
            if softcap is not None:  # logits = cap * tanh(z / cap); d logits / dz = 1 - tanh^2
                capped = torch.tanh(z.float() / softcap)
                z = capped * softcap
            logp = torch.log_softmax(z, dim=-1, dtype=torch.float32)
            del z
            safe_y = y.clamp(min=0)
            total -= torch.where(valid, logp.gather(1, safe_y[:, None]).squeeze(1), 0.0).sum()
            if need_h or need_w:
                probs = logp.exp_()  # softmax in place: d(sum CE)/d logits = p - onehot
                probs[torch.arange(len(y), device=y.device), safe_y] -= valid.float()
                if n_valid < len(y):
                    probs.mul_(valid[:, None])
                if capped is not None:
                    probs.mul_(1 - capped.square_())
                d_logits = probs.to(hidden.dtype)
                if need_h:
                    grad_h[start:start + chunk] = d_logits @ weight
                if need_w:
                    grad_w += (d_logits.t() @ h).float()  # bf16 products accumulate in fp32 inside the matmul
                del probs, d_logits  # free this chunk before the next one is made
            del logp, capped
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Summed CE of ``hidden`` (N, C) through the head ``weight`` (V, C) against ``labels`` (N,).

    ``softcap`` soft-caps the logits as cap * tanh(z / cap) first (Gemma's final_logit_softcapping).
    """
    grad = torch.is_grad_enabled()
    need_w = grad and weight.requires_grad
    chunk = chunk or default_chunk(hidden.device, weight.shape[0], need_w)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, grad and hidden.requires_grad, need_w, softcap)


def lm_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of cross-entropy over positions whose label is not -100 (labels are already shifted).

    ``position_ids`` mark packed rows (see the models' ``hidden_states``). Logits are computed in
    the hidden states' dtype and upcast to float32 for the softmax.
    """
    hidden = model.hidden_states(input_ids) if position_ids is None else \
        model.hidden_states(input_ids, position_ids=position_ids)  # (B, T, C)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    return linear_cross_entropy_sum(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten(),
                                    softcap=getattr(model, "logit_softcap", None))


class CausalLMLoss(nn.Module):
    """A model and its loss as one module: what DDP and FSDP2 wrap, so that their hooks (gradient
    all-reduce, parameter gathering) run around the whole step, head and loss included."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return lm_loss_sum(self.model, input_ids, labels, position_ids)

    def run(self, fn, *args):
        """``fn(model, *args)``: FSDP2 registers this as a forward, so that generation outside the training
        forward sees the root unit's weights gathered (see dist/parallel.run_on_model)."""
        return fn(self.model, *args)


def count_targets(labels: torch.Tensor) -> int:
    """Positions that contribute to the loss."""
    return int((labels != IGNORE).sum())
