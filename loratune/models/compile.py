"""Regional compilation (the recipe's ``compile``): ``torch.compile`` of each transformer block, not of
the whole model.

Inductor fuses what eager PyTorch runs as separate kernels inside a block: the norms, rotary
embeddings, the gated activation, the residual adds and the LoRA adds around each frozen matmul,
forward and backward. Compiling blocks rather than the model (as transformers' and torchtune's
regional compilation do) keeps the compile time to about one block's: every block of a stack runs
the same code, and dynamo treats a block's parameters as inputs, so the blocks share one compiled
graph (one more where layers differ: Gemma's sliding and global layers, SmolLM3's NoPE layers). The
embeddings, the output head and the chunked loss stay eager; they are one matmul each.

What runs compiled: a block called without a KV cache (training, evaluation, scoring). A call with
a cache (``generate``, the serving engine) runs the eager block, because the cache's length changes
every decode step and each change would be a new graph. Sequence length is marked dynamic, so
batches of varying length share a graph (one more for attention's short-sequence path,
``attention.MATMUL_MAX_T``). Activation recompute wraps the compiled block (the recomputation
calls it again), which works since the block is a plain function of its inputs to autograd.

The compile time (dynamo's and inductor's own timers, backward included) and the number of graphs
are kept in :data:`STATS`; :func:`compile_report` turns them into the log line and the metrics the
training loop writes after its first step. Exactness against eager (logits, every gradient, a
20-step loss curve; fp32 and bf16) is in tests/models/test_compile.py; the measured speed and
compile time per shape in benchmarks/results/compile.json (benchmarks/bench_compile.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .decoder import DecoderLayer
from .gpt2 import Block
from .kv_cache import KVCache

log = logging.getLogger("loratune")

BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block, DecoderLayer)
"""The modules compiled: GPT-2's block and the Llama-style decoder layer."""


@dataclass
class CompileStats:
    """What compiling the blocks has cost in this process so far."""

    seconds: float = 0.0
    """Wall time of the block calls that compiled (dynamo, AOTAutograd and inductor; the backward graph
    compiles there too, unless torch defers it to the first backward)."""
    backward_inside: float = 0.0
    """Of ``seconds``, inductor's backward compiles (the rest of the backward compile time came later)."""
    graphs: int = 0
    """Graphs compiled: one per kind of block call (a new layer kind, the first block's input that needs no
    gradient, attention's short- and long-sequence paths, evaluation's no_grad), not per length."""
    reported_graphs: int = 0
    """``graphs`` when :func:`compile_report` last reported."""


STATS = CompileStats()
"""This process's compile cost (the compiled code is per process too)."""


def _run_block(block: nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
    return block._call_impl(x, *args)  # the block's hooks and forward (not its _compiled_call_impl: no recursion)


RECOMPILE_LIMIT = 32
"""Graphs dynamo keeps for the one compiled block function before it falls back to eager (its default, 8,
is for one function of one model: a Gemma's two layer kinds, in training and evaluation, at short and long
lengths, packed or not, reach it)."""

_compiled_run_block = None


def _compiled():
    global _compiled_run_block
    if _compiled_run_block is None:  # one compiled function for every block: the blocks share its graphs
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        _compiled_run_block = torch.compile(_run_block, dynamic=None)
    return _compiled_run_block


class _BlockCall:
    """Set as a block's ``_compiled_call_impl`` (what ``nn.Module.compile`` sets): the compiled block
    when no KV cache is passed, the eager one otherwise."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if any(isinstance(a, KVCache) for a in args):
            return self.block._call_impl(x, *args)
        _mark_length_dynamic(x, args)
        graphs, backward, start = _graph_count(), backward_compile_seconds(), time.perf_counter()
        out = _compiled()(self.block, x, *args)
        if _graph_count() != graphs:  # this call compiled
            STATS.graphs += _graph_count() - graphs
            STATS.seconds += time.perf_counter() - start
            STATS.backward_inside += backward_compile_seconds() - backward
        return out


def _mark_length_dynamic(x: torch.Tensor, args: tuple) -> None:
    """Mark the sequence length dynamic wherever it appears (x (B, T, C), rotary tables (B, T, hs), masks
    (B, 1, T, L)), so that batches of other lengths reuse the graph: one unmarked tensor of length T would
    make dynamo specialize on it and recompile for the next length."""
    T = x.shape[1] if x.dim() == 3 else 0
    if T <= 1:  # decoding-sized calls: torch specializes 0 and 1 anyway
        return
    for t in torch.utils._pytree.tree_leaves((x, args)):
        if isinstance(t, torch.Tensor):
            # (B, T, width) and (B, 1, T, L): neither the batch nor a width is a length, even when equal to T
            dims = [1] if t.dim() == 3 else [d for d in range(t.dim()) if d > 0 or t.dim() < 3]
            for dim in dims:
                if t.shape[dim] == T:
                    torch._dynamo.maybe_mark_dynamic(t, dim)


def _graph_count() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_blocks(model: nn.Module, enabled: bool = True) -> int:
    """Compile (``enabled``) or restore to eager every transformer block of ``model``; returns how many.

    Nothing compiles here: the first forward through a block does (seconds to minutes on a CPU, see
    :data:`STATS`; inductor keeps the compiled kernels in its disk cache for the next run). Turning it
    off restores the eager blocks. The model stays the same module (its state dict, its adapters and
    their saving are untouched), so the rest of loratune needs to know nothing of it.
    """
    blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
    if enabled and not blocks:
        raise ConfigError(f"compile: true compiles the transformer blocks, but {type(model).__name__} has none "
                          "loratune knows: use a model loaded by loratune (load_model), or compile: false")
    if enabled and any(p.device.type == "cpu" for p in model.parameters()) and not _cpp_compiler():
        raise ConfigError("compile: true on the CPU needs a C++ compiler for inductor's kernels (g++ or clang++ on "
                          "PATH, or CXX): install one, or compile: false")
    for block in blocks:
        if enabled or isinstance(block._compiled_call_impl, _BlockCall):
            block._compiled_call_impl = _BlockCall(block) if enabled else None
    return len(blocks)


def _cpp_compiler() -> str | None:
    return os.environ.get("CXX") or next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)


def compiled(model: nn.Module) -> bool:
    """Whether ``model``'s blocks are compiled (:func:`compile_blocks`)."""
    return any(isinstance(getattr(m, "_compiled_call_impl", None), _BlockCall) for m in model.modules())


def backward_compile_seconds() -> float:
    """Seconds inductor has spent compiling backward graphs in this process (they compile lazily, at the
    first backward through a new graph, outside the forward that :data:`STATS` times)."""
    times = torch._dynamo.utils.compilation_time_metrics
    return float(sum(sum(v) for k, v in times.items() if "bw_compiler" in k))


def compile_report(model: nn.Module) -> dict[str, Any] | None:
    """After a step that compiled (the first, and any that recompiled: a new shape regime or a
    recompile that should not happen): ``{"compile_s", "compile_graphs"}`` so far in this process, for the
    metrics, and logged; None when the blocks are not compiled or nothing compiled since the last report."""
    if STATS.graphs == STATS.reported_graphs or not compiled(model):
        return None
    STATS.reported_graphs = STATS.graphs
    seconds = STATS.seconds + backward_compile_seconds() - STATS.backward_inside
    log.info(f"compile: {STATS.graphs} block graph(s) compiled so far, {seconds:.1f} s (forward and backward)")
    return {"compile_s": round(seconds, 2), "compile_graphs": STATS.graphs}
