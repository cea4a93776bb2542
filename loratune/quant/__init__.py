"""Quantized storage for frozen base weights (QLoRA).

- ``nf4``: NF4 tensors, bitsandbytes' format and rounding.
- ``int8``: int8 weight-only storage (torchao's) and :class:`Int8Linear`.
- ``linear``: the frozen linear layers that hold quantized weights (:class:`NF4Linear`).
- ``gguf_blocks``: GGUF's quantized blocks (Q8_0 ... Q6_K) decoded in torch, bit for bit as gguf-py.
- ``gguf_linear``: :class:`GGUFLinear`, a frozen linear holding a GGUF file's own blocks (``quantize: gguf``).
- ``model``: quantize a model's frozen base, and undo it (merging a QLoRA adapter is in :mod:`loratune.merge`).
- ``load``: the base quantized while it loads (each projection as it is read; the float model never whole).
"""

from .gguf_blocks import dequantize_blocks
from .gguf_linear import GGUFLinear
from .int8 import Int8Linear, dequantize_int8, quantize_int8
from .linear import NF4Linear, QuantizedLinear, frozen_linear, nf4_linear
from .nf4 import NF4_LEVELS, NF4Weight, bits_per_param, block_absmax, dequantize_nf4, quantize_nf4

__all__ = ["GGUFLinear", "Int8Linear", "NF4_LEVELS", "NF4Linear", "NF4Weight", "QuantizedLinear", "bits_per_param", "block_absmax",
           "dequantize_blocks", "dequantize_int8", "dequantize_nf4", "frozen_linear", "nf4_linear", "quantize_int8", "quantize_nf4"]
