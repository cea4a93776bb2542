"""QLoRA's base quantized while it loads: each projection read, quantized and freed before the next.

Loading the base whole in its stored dtype and quantizing it afterwards makes the process's peak the
float model's, which is what QLoRA exists to avoid. Here the loader (:func:`~loratune.models.load_model`
reading safetensors or a GGUF one tensor at a time) hands each projection's weight to
:class:`QuantizingHook` as it is read; the hook quantizes it (NF4 or int8, on the device it trains on)
and the float copy is freed before the next tensor is read. With ``quantize: gguf`` the file's own
blocks become the layer without being dequantized (only decoded once, a tensor at a time, to check
that they are finite). The setup peak is then the quantized base, the unquantized tensors
(embeddings, norms, the head), one float tensor and the quantizer's temporaries for it.

The model is the one the old order (load, inject the adapter, :func:`~.model.quantize_model`) gives,
bit for bit: the same projections are quantized from the same float values (the checkpoint's 16-bit
dtype, as :func:`~.model.load_dtype` chooses), and the adapter's A is drawn from the same RNG in the same
order. Starts that need the float weight -- PiSSA and OLoRA (their residual is what is quantized) and a
DoRA magnitude -- read that one weight again from the file when its layer's adapter starts
(:func:`inject_quantized`), so they too give today's model without the float model in memory.
A ``pytorch_model.bin`` cannot be read a tensor at a time: its pickle is loaded whole, as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..adapters.init import initialise, parse_init
from ..adapters.lora import LoRAConfig, lora_layers
from ..adapters.targets import HEAD_NAMES, inject_lora
from ..errors import CheckpointError, ConfigError
from ..hub.files import read_config
from ..models import load_model, resolve_model
from ..models.gguf_dir import is_gguf_dir, read_gguf_blocks
from ..models.registry import family_for_config
from ..runtime.finite import check_finite
from .gguf_linear import GGUFLinear
from .model import QuantConfig, _quantized, release_freed_memory


class QuantizingHook:
    """The linear hook (:data:`loratune.models.weight_map.LinearHook`) that quantizes each projection but
    the head as it is read: what :func:`~.model.quantize_model` would make of it, built from the float
    weight before the next tensor is read.

    ``blocks``: for ``gguf``, the file's blocks by weight name (projections the file stores as floats stay
    float). ``keep_readers``: remember how to read each quantized weight again (:func:`inject_quantized`).
    """

    def __init__(self, cfg: QuantConfig, device: torch.device, blocks: dict | None = None,
                 keep_readers: bool = False, where: str = "model weights") -> None:
        self.cfg, self.device, self.blocks, self.where = cfg, torch.device(device), blocks, where
        self.readers: dict[str, Callable[[], torch.Tensor]] | None = {} if keep_readers else None
        self.count = 0
        """Projections quantized so far."""

    def __call__(self, name: str, read: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor | nn.Module:
        module = name.removesuffix(".weight")
        if module.split(".")[-1] in HEAD_NAMES:
            return read()  # the head keeps its dtype, as quantize_model leaves it
        if self.cfg.kind == "gguf":
            quant = self._kept(name, shape)
            if quant is None:
                return read()  # stored as floats in the file: stays float
        else:
            weight = read().to(self.device)  # (out, in), quantized where it will train, as quantize_model does
            quant = _quantized(weight, None, self.cfg, False)
            del weight  # freed here, before the next tensor is read
        if self.readers is not None:
            self.readers[module] = read
        self.count += 1
        return quant

    def _kept(self, name: str, shape: tuple[int, ...]) -> nn.Module | None:
        b = self.blocks.pop(name, None)
        if b is None:
            return None
        if tuple(b.shape) != tuple(shape):
            raise CheckpointError(f"GGUF tensor {name} has shape {tuple(b.shape)}, but the metadata implies {shape}")
        quant = GGUFLinear.from_blocks(type(b)(b.data.to(self.device), b.qtype, b.shape))
        check_finite({name: quant.dequantized_weight(torch.float32)}, self.where,  # one tensor decoded, then freed
                     "the file is corrupt: download or export it again")
        return quant


def load_quantized(model: str | Path, cfg: QuantConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                   keep_readers: bool = False) -> tuple[nn.Module, Path, QuantizingHook]:
    """Load ``model`` with every projection but the head quantized as it is read (``dtype``: what the float
    weights are read in before quantizing, :func:`~.model.load_dtype`; what stays float keeps it).

    Returns (model, its directory, the hook: how many were quantized, and with ``keep_readers`` how to read
    each weight again). A model with nothing to quantize is refused as :func:`~.model.quantize_model` refuses it.
    """
    device = torch.device(device)
    blocks = None
    if cfg.kind == "gguf":
        model_dir = resolve_model(model)
        if not is_gguf_dir(model_dir):
            raise ConfigError(f"quantize: gguf keeps a GGUF file's own quantization, but {model_dir} is not a GGUF "
                              "model: pass a .gguf file as the model, or use quantize: nf4 or int8")
        family = family_for_config(read_config(model_dir))
        config = family.config_from_hf(read_config(model_dir))
        blocks = read_gguf_blocks(model_dir, family, config)  # the quantized base itself, no more
    hook = QuantizingHook(cfg, device, blocks, keep_readers)
    loaded, model_dir = load_model(model, dtype=dtype, device=device, linear_hook=hook)
    hook.where, hook.blocks = f"model weights in {model_dir}", None
    if not hook.count:
        raise ConfigError("the model has no linear projections to quantize" if blocks is None else
                          f"{model_dir}'s GGUF stores none of the model's linear projections quantized (all float): "
                          "there is no quantization to keep; use quantize: none")
    release_freed_memory()
    return loaded, model_dir, hook


def needs_float_start(lora: LoRAConfig) -> bool:
    """Whether an adapter's start reads the float base weight: PiSSA/OLoRA (A and B from its decomposition,
    the residual quantized) and variants with their own state (DoRA's magnitude, the float weight's row norms)."""
    return parse_init(lora.init).changes_base or lora.variant != "lora"


@torch.no_grad()
def inject_quantized(model: nn.Module, lora: LoRAConfig, cfg: QuantConfig,
                     readers: dict[str, Callable[[], torch.Tensor]] | None, adapter: str = "default") -> list[str]:
    """:func:`~loratune.adapters.targets.inject_lora` on a base quantized while loading, giving the model the old
    order (inject on the float base, then quantize) gives; returns the adapted module names.

    A start that needs no float weight (default, gaussian) is injected as it is. Otherwise (see
    :func:`needs_float_start`) every adapter is injected with the default start (A drawn from the RNG
    as then), and then, layer by layer in the order the start goes, the layer's float weight is read again
    (``readers``, kept by :class:`QuantizingHook`), the start applied to it, and the result quantized (the
    residual of PiSSA/OLoRA) or the quantized base put back (DoRA): one float weight at a time.
    """
    if not needs_float_start(lora):
        return inject_lora(model, lora, adapter)
    if readers is None:
        raise ConfigError(f"internal: lora.init={lora.init} / {lora.variant} on a base quantized while loading needs "
                          "its float weights read again (load_quantized(keep_readers=True))")
    changes_base = parse_init(lora.init).changes_base
    names = inject_lora(model, dataclasses.replace(lora, init="default"), adapter)
    for name, layer in lora_layers(model):
        if adapter not in layer.lora:
            continue
        quant = layer.quant
        if quant is not None:  # the float weight back for the start, read again from the file
            layer.quant = None
            layer.weight = nn.Parameter(readers[name]().to(quant.device), requires_grad=False)
            layer.bias = None if quant.bias is None else nn.Parameter(quant.bias, requires_grad=False)
            layer.lora[adapter].start(layer)  # a variant's state from the float weight, as at injection
        initialise([layer], lora.init, adapter)
        if quant is not None:
            layer.quant = _quantized(layer.weight, layer.bias, cfg, layer.fan_in_fan_out) if changes_base else quant
            layer.weight = layer.bias = None
    release_freed_memory()
    return names
