"""Quantized storage for frozen base weights (QLoRA): NF4 tensors (``nf4``, bitsandbytes' format and
rounding), int8 weight-only (``int8``, torchao's), and the frozen linear layers that hold them
(``linear``: :class:`NF4Linear`; ``int8``: :class:`Int8Linear`)."""

from .int8 import Int8Linear, dequantize_int8, quantize_int8
from .linear import NF4Linear, QuantizedLinear, frozen_linear, nf4_linear
from .nf4 import NF4_LEVELS, NF4Weight, bits_per_param, block_absmax, dequantize_nf4, quantize_nf4

__all__ = ["Int8Linear", "NF4_LEVELS", "NF4Linear", "NF4Weight", "QuantizedLinear", "bits_per_param", "block_absmax",
           "dequantize_int8", "dequantize_nf4", "frozen_linear", "nf4_linear", "quantize_int8", "quantize_nf4"]
