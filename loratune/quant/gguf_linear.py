"""A frozen linear layer that holds a GGUF file's own quantized blocks (``quantize: gguf``).

llama.cpp runs a GGUF model on the weights its blocks decode to. A LoRA adapter trained against
those same weights is trained for what llama.cpp will run: no re-quantization in between (as NF4
would add), and the base costs what the file costs (Q4_1: 5 bits per weight, Q4_K 4.5, Q8_0 8.5).

:class:`GGUFLinear` is a :class:`~loratune.quant.linear.QuantizedLinear`: the bytes are a uint8
buffer (rows, bytes per row) exactly as the file stores them, decoded for each product (forward,
and again in backward for the input gradient) by :mod:`.gguf_blocks`, bit for bit as gguf-py
decodes them, so the layer computes ``F.linear`` on the very weights ``loratune`` loads from the
file dequantized. Nothing full-size is kept for backward.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..hub.gguf_file import FLOAT_TYPES, GGUFBlocks
from .gguf_blocks import BLOCK_SIZES, dequantize_blocks, row_bytes
from .linear import QuantizedLinear


class GGUFLinear(QuantizedLinear):
    """A frozen ``nn.Linear`` stored as GGUF blocks of type ``qtype``: buffer ``weight_data`` (out, bytes
    per row) uint8, an optional frozen bias buffer, no parameters. Build one with :meth:`from_blocks`; the
    constructor makes zero storage of the right size, for loading a state dict into."""

    quant_buffers = ("weight_data",)

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if qtype not in BLOCK_SIZES or qtype in FLOAT_TYPES:
            kinds = ", ".join(t for t in BLOCK_SIZES if t not in FLOAT_TYPES)
            raise ConfigError(f"GGUFLinear holds quantized GGUF types ({kinds}), not {qtype}")
        self.in_features, self.out_features, self.qtype = int(in_features), int(out_features), qtype
        nbytes = row_bytes(qtype, self.in_features)
        self.register_buffer("weight_data", torch.zeros(self.out_features, nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_blocks(cls, blocks: GGUFBlocks, bias: torch.Tensor | None = None) -> GGUFLinear:
        """Hold ``blocks`` (a weight of shape (out, in), as :func:`~loratune.models.gguf_dir.read_gguf_blocks`
        gives it) without a copy, and ``bias`` (out,) as it is, frozen."""
        if len(blocks.shape) != 2:
            raise ConfigError(f"GGUFLinear needs a 2-D weight, got shape {tuple(blocks.shape)}")
        out_features, in_features = blocks.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ConfigError(f"bias of shape {tuple(bias.shape)} does not fit a weight with {out_features} outputs")
        module = cls(in_features, out_features, blocks.qtype, bias=False, device=blocks.data.device)
        if tuple(blocks.data.shape) != tuple(module.weight_data.shape) or blocks.data.dtype != torch.uint8:
            raise ConfigError(f"{blocks.qtype} blocks of a ({out_features}, {in_features}) weight must be uint8 of "
                              f"shape {tuple(module.weight_data.shape)}, got {blocks.data.dtype} "
                              f"{tuple(blocks.data.shape)}")
        module.weight_data = blocks.data
        module.bias = None if bias is None else bias.detach().clone()
        return module

    @property
    def blocks(self) -> GGUFBlocks:
        """The weight as :class:`GGUFBlocks` over this module's buffer (no copy): what export writes back."""
        return GGUFBlocks(self.weight_data, self.qtype, (self.out_features, self.in_features))

    @property
    def bits_per_param(self) -> float:
        """Stored bits per weight value (bias not counted): Q4_1 5.0, Q8_0 8.5, Q4_K 4.5, Q6_K 6.5625."""
        size, nbytes = BLOCK_SIZES[self.qtype]
        return nbytes * 8 / size

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in ``dtype``, decoded as gguf-py decodes it."""
        return dequantize_blocks(self.weight_data, self.qtype, (self.out_features, self.in_features), dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gguf {self.qtype}")
