"""CPU inference with pre-packed weights: the linear layers' matrices reordered once for oneDNN.

A plain ``F.linear`` on CPU with bf16 (or small-batch fp32) inputs reorders its weight into
oneDNN's blocked layout on every call; in token-by-token decoding that reorder costs as much as
the product itself. :func:`prepacked_linears` reorders every projection of a model once and, for
as long as the context lasts, routes its forward passes through the packed copies (the original
weights are untouched, so merging, saving and training see nothing). Packed products stream the
weights faster, at one row and more so at several; the decoding speed it gives is in the ``generate``
rows of benchmarks/results/cpu-llama.json and cpu.json (benchmarks/bench_train.py). Results are
bit-identical in bf16 and agree to float rounding in fp32 (tests/generate/test_cpu_prepack.py).

float32 weights are packed only for batches of several rows: at one row, oneDNN's packed float32
product decoded slower than the plain one when this was measured (bf16 packed is faster at one row).

Only for inference (no autograd through packed weights) on CPU, bf16 or fp32; anywhere else, where
this PyTorch build lacks the oneDNN ops, or for bf16 where the CPU has no bf16 support in oneDNN
(AVX2-only CPUs), the context changes nothing. The packed copies
are extra memory (one more copy of the weights) for as long as the context lasts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.lora import LoRALinear

log = logging.getLogger("loratune")
_DTYPES = (torch.float32, torch.bfloat16)


def bf16_prepack_supported() -> bool:
    """Whether oneDNN packs bf16 weights on this CPU: it needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, which an
    AVX2-only CPU (many AMD EPYCs) lacks; there bf16 products take the ordinary path."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe is not None and probe())


def prepack_available(weight: torch.Tensor) -> bool:
    """Whether weights like this one can be packed: CPU, fp32 (or bf16 where the CPU supports it), and this
    build has oneDNN's ops."""
    return (weight.device.type == "cpu" and weight.dtype in _DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and (weight.dtype != torch.bfloat16 or bf16_prepack_supported()))


def _prepacked_fn(weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    """A function x -> x W^T + b using a oneDNN-packed copy of ``weight`` (out, in)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    b = bias.detach() if bias is not None else None
    dtype = weight.dtype

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype or torch.is_grad_enabled():  # autocast or autograd: the ordinary path
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")

    return linear


@contextlib.contextmanager
def prepacked_linears(model: nn.Module, rows: int = 1) -> Iterator[int]:
    """Within the block, ``model``'s ``nn.Linear`` and LoRA base products use packed weights (a quantized
    base is not packed: it is dequantized per product).

    ``rows`` is the expected number of rows per product (the decoding batch size); any size
    works, that one is fastest. Yields the number of layers packed (0 where packing does not
    apply). Weights must not change inside the block.
    """
    patched: list[tuple[nn.Module, str]] = []

    def worth_it(weight: torch.Tensor) -> bool:
        return prepack_available(weight) and (weight.dtype == torch.bfloat16 or rows > 1)

    try:
        for module in model.modules():
            if isinstance(module, LoRALinear) and not module.fan_in_fan_out and module.quant is None:
                if worth_it(module.weight):
                    module._base = _prepacked_fn(module.weight, module.bias, rows)  # instance attribute shadows the method
                    patched.append((module, "_base"))
            elif type(module) is nn.Linear and worth_it(module.weight):
                module.forward = _prepacked_fn(module.weight, module.bias, rows)
                patched.append((module, "forward"))
    except RuntimeError as exc:  # an op this oneDNN build refuses: fall back to the ordinary path
        log.debug(f"weight packing unavailable ({exc}); using plain linear layers")
        _restore(patched)
        patched = []
    try:
        yield len(patched)
    finally:
        _restore(patched)


def _restore(patched: list[tuple[nn.Module, str]]) -> None:
    for module, name in patched:
        module.__dict__.pop(name, None)
    patched.clear()
