"""Quantize a model's frozen base (QLoRA), and undo it for merging and export.

Every linear projection except the output head is stored in 4-bit NF4 (``nf4``, block 64,
optionally with double-quantized block scales) or per-row int8 (``int8``), or, for a GGUF model,
kept in the file's own quantized blocks (``gguf``: :mod:`.gguf_linear`; projections the file stores
as F32/F16 stay float); embeddings, norms and the head keep their dtype, as in QLoRA and
bitsandbytes. LoRA layers keep their adapters and hold the quantized base in place of their weight.
The model is quantized *after* the adapter is injected, so PiSSA/OLoRA starts quantize the residual,
as PEFT does. A training run does not call :func:`quantize_model` on a loaded float model: it quantizes
each projection as it is read (:mod:`.load`), which gives the same model without the float one in memory.

``dequantize_model`` turns every quantized layer back into float weights: what a QLoRA adapter
was trained against, which is where it should be merged (``loratune merge``). For ``gguf`` that is
the GGUF loaded dequantized, bit for bit: merging needs no re-quantization.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.lora import LoRALinear
from ..adapters.targets import HEAD_NAMES, linear_kind, replace_module
from ..errors import ConfigError
from .gguf_blocks import dequantize_blocks
from .gguf_linear import GGUFLinear
from .int8 import Int8Linear
from .linear import NF4Linear

KINDS = ("nf4", "int8", "gguf")


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base is stored."""

    kind: str = "nf4"
    """nf4 (QLoRA's 4-bit NormalFloat), int8 (per-row absmax), or gguf (a GGUF model's own quantized
    blocks, kept: the base llama.cpp runs)."""
    block_size: int = 64
    """NF4 values sharing one absmax scale (QLoRA: 64)."""
    double_quant: bool = True
    """Quantize NF4's block scales again (8-bit, block 256): ~0.37 fewer bits per parameter."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"quantize must be one of none, {', '.join(KINDS)}; got {self.kind!r}")

    def record(self) -> dict[str, Any]:
        """What an adapter's metadata records about the base it was trained against (for ``gguf`` the kind
        alone: the blocks are the file's, named by the adapter's base model)."""
        return {"kind": self.kind} if self.kind == "gguf" else asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "QuantConfig":
        try:
            return cls(**record)
        except TypeError:
            raise ConfigError(f"unreadable base_quantization record {record!r} in the adapter's metadata") from None


def recipe_quantization(recipe) -> QuantConfig | None:
    """The recipe's ``quantize`` / ``double_quant`` as a QuantConfig (None for ``quantize: none``)."""
    if recipe.quantize == "none":
        return None
    if recipe.quantize == "gguf":
        return QuantConfig("gguf")
    return QuantConfig(recipe.quantize, double_quant=recipe.double_quant)


def load_dtype(model: str, train_dtype: torch.dtype) -> torch.dtype:
    """The dtype to load a checkpoint in before quantizing it: its own 16-bit dtype when it has one
    (lossless, and half the float32 peak while loading), else the training dtype. What stays
    unquantized is cast to the training dtype afterwards."""
    from ..hub.export import config_dtype
    from ..hub.files import read_config
    from ..models import resolve_model

    stored = config_dtype(read_config(resolve_model(model)))
    return stored if stored in (torch.bfloat16, torch.float16) else train_dtype


@torch.no_grad()
def cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast what stays unquantized of the frozen base (embeddings, norms, the head) to ``dtype``; the
    adapters keep their float32 masters and the quantized storage its format."""
    for name, p in model.named_parameters():
        if ".lora." not in name and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def gguf_weight_blocks(model: nn.Module, model_dir: Path | None) -> dict:
    """transformers weight name -> the GGUF blocks the file stores it in, for the quantized 2-D weights of
    the GGUF ``model_dir`` stands for; a ConfigError when it stands for no GGUF."""
    from ..models.gguf_dir import is_gguf_dir, read_gguf_blocks

    if model_dir is None or not is_gguf_dir(model_dir):
        raise ConfigError(f"quantize: gguf keeps a GGUF file's own quantization, but {model_dir or 'this model'} is "
                          "not a GGUF model: pass a .gguf file as the model, or use quantize: nf4 or int8")
    return read_gguf_blocks(model_dir, model.family, model.config)


def _kept_gguf(name: str, weight: torch.Tensor, bias: torch.Tensor | None, blocks: dict,
               transposed: bool) -> nn.Module | None:
    """The GGUF blocks of layer ``name`` as a GGUFLinear, or None where the file stores its weight as floats.
    The blocks must decode to exactly the weight the model loaded from the file."""
    b = blocks.get(f"{name}.weight")
    if b is None:
        return None
    decoded = dequantize_blocks(b.data, b.qtype, b.shape, weight.dtype).to(weight.device)
    if transposed or tuple(b.shape) != tuple(weight.shape) or not torch.equal(decoded, weight):
        raise ConfigError(f"{name}: its weight is not the GGUF's {b.qtype} blocks decoded (a PiSSA/OLoRA start moves "
                          "part of it into the adapter, which the file's blocks cannot hold): use lora.init default "
                          "or gaussian with quantize: gguf")
    return GGUFLinear.from_blocks(type(b)(b.data.to(weight.device), b.qtype, b.shape), bias)


def _quantized(weight: torch.Tensor, bias: torch.Tensor | None, cfg: QuantConfig, transposed: bool,
               name: str = "", blocks: dict | None = None) -> nn.Module | None:
    if cfg.kind == "gguf":
        return _kept_gguf(name, weight, bias, blocks or {}, transposed)
    weight = weight.float()  # the same codes whatever dtype the checkpoint was loaded in (merge re-quantizes)
    if cfg.kind == "int8":
        return Int8Linear.from_weight(weight, bias, transposed=transposed)
    return NF4Linear.from_weight(weight, bias, cfg.block_size, cfg.double_quant, transposed=transposed)


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig, model_dir: Path | None = None) -> int:
    """Store every linear projection but the head quantized, in place; returns how many were.

    ``gguf`` takes the blocks from the GGUF file ``model_dir`` (what :func:`~loratune.models.load_model`
    returned) stands for, and keeps as floats the projections the file stores as floats.
    The float weights are released layer by layer (nothing else holds them), so the peak stays
    at the float model's size plus one layer; :mod:`.load` avoids that peak when loading for training.
    """
    blocks = gguf_weight_blocks(model, model_dir) if cfg.kind == "gguf" else None
    count = 0
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] in HEAD_NAMES:
            continue
        if isinstance(module, LoRALinear):
            if module.quant is None:
                if module.merged:
                    raise ConfigError(f"{name} has a merged adapter: unmerge it before quantizing the base")
                quant = _quantized(module.weight, module.bias, cfg, module.fan_in_fan_out, name, blocks)
                if quant is not None:
                    module.quant, module.weight, module.bias = quant, None, None
                    count += 1
        elif linear_kind(module) is not None and not getattr(module, "is_quantized", False):
            quant = _quantized(module.weight, module.bias, cfg, bool(linear_kind(module)), name, blocks)
            if quant is not None:
                replace_module(model, name, quant)
                count += 1
    if not count:
        raise ConfigError("the model has no linear projections to quantize" if blocks is None else
                          f"{model_dir}'s GGUF stores none of the model's linear projections quantized (all float): "
                          "there is no quantization to keep; use quantize: none")
    release_freed_memory()
    return count


def release_freed_memory() -> None:
    """Hand the float weights just freed back to the OS (glibc keeps freed heap memory otherwise: on a
    1B model ~0.6 GB of resident memory after quantizing). A no-op where glibc's malloc_trim is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every quantized base by its dequantized float weights in ``dtype``; returns how many.

    Layers come back as ``nn.Linear`` (LoRA layers keep their adapters, with a plain weight again),
    stored (out, in) whatever the original layout: what merging and export expect.
    """
    count = 0
    modules = list(model.named_modules())
    inside = {f"{n}.quant" for n, m in modules if isinstance(m, LoRALinear)}  # handled with their LoRA layer
    for name, module in modules:
        if name in inside:
            continue
        if isinstance(module, LoRALinear) and module.quant is not None:
            q = module.quant
            module.weight = nn.Parameter(q.dequantized_weight(dtype), requires_grad=False)
            module.bias = None if q.bias is None else nn.Parameter(q.bias.to(dtype), requires_grad=False)
            module.quant, module.fan_in_fan_out = None, False
            count += 1
        elif getattr(module, "is_quantized", False):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.device, dtype=dtype)
            linear.weight.copy_(module.dequantized_weight(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
            linear.requires_grad_(False)
            replace_module(model, name, linear)
            count += 1
    return count


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The quantized base layers of a model (standalone, or inside LoRA layers)."""
    found = []
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.quant is not None:
            found.append(module.quant)
        elif getattr(module, "is_quantized", False) and module not in found:
            found.append(module)
    return found


def base_bits(model: nn.Module) -> tuple[float, float]:
    """(bits per parameter of the quantized layers, bits per parameter of the whole base model):
    stored bytes x 8 over parameter counts; adapters and bias terms are not counted, tied weights once."""
    layers = quantized_layers(model)
    q_params = sum(m.in_features * m.out_features for m in layers)
    q_bits = sum(m.bits_per_param * m.in_features * m.out_features for m in layers)
    seen, other_params, other_bits = set(), 0, 0.0
    for name, p in model.named_parameters():
        if ".lora." in name or id(p) in seen:
            continue
        seen.add(id(p))
        if not name.endswith("bias"):
            other_params += p.numel()
            other_bits += p.numel() * p.element_size() * 8
    total = q_params + other_params
    return (q_bits / q_params if q_params else 0.0), ((q_bits + other_bits) / total if total else 0.0)
