"""Quantized storage for frozen base weights (QLoRA).

- ``nf4``: NF4 tensors, bitsandbytes' format and rounding.
- ``int8``: int8 weight-only storage (torchao's) and :class:`Int8Linear`.
- ``linear``: the frozen linear layers that hold quantized weights (:class:`NF4Linear`).
- ``model``: quantize a model's frozen base, and undo it (merging a QLoRA adapter is in :mod:`loratune.merge`).
"""

from .int8 import Int8Linear, dequantize_int8, quantize_int8
from .linear import NF4Linear, QuantizedLinear, frozen_linear, nf4_linear
from .nf4 import NF4_LEVELS, NF4Weight, bits_per_param, block_absmax, dequantize_nf4, quantize_nf4

__all__ = ["Int8Linear", "NF4_LEVELS", "NF4Linear", "NF4Weight", "QuantizedLinear", "bits_per_param", "block_absmax",
           "dequantize_int8", "dequantize_nf4", "frozen_linear", "nf4_linear", "quantize_int8", "quantize_nf4"]
