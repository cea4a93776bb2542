"""Apply a LoRA initialisation (:mod:`.init`) to the layers of a freshly injected adapter.

PiSSA and OLoRA move the top of each base weight into A and B and leave the residual as the
frozen base, so the model's output is unchanged at step 0 but training starts from the
weight's principal directions. Each slice of a fused projection (GPT-2's q and v of
``c_attn``) is decomposed on its own rows. The starting A and B are kept as buffers
(``lora_init_A``, ``lora_init_B``): saving converts the adapter back to a plain one on the original
base (:func:`~.init.to_plain_lora`), as PEFT's ``path_initial_model_for_weight_conversion`` does.
Under QLoRA the residual is what gets quantized (the model is quantized after injection).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from . import dora
from .init import gaussian_init, olora_init, parse_init, pissa_init
from .lora import LoRAConfig, LoRALinear, lora_layers


def initialise(model: nn.Module, cfg: LoRAConfig, adapter: str) -> None:
    """Set adapter ``adapter``'s starting A and B (and the residual base) on every layer that has it."""
    if cfg.init == "default":
        return
    for _, layer in lora_layers(model):
        if adapter in layer.lora:
            _initialise_layer(layer, cfg.init, adapter)


@torch.no_grad()
def _initialise_layer(layer: LoRALinear, init: str, adapter: str) -> None:
    u = layer.lora[adapter]
    if init == "gaussian":
        for name, (start, stop) in u.slices.items():
            a, _ = gaussian_init(u.r, u.in_features, stop - start)
            u.lora_A[name].copy_(a)
        return
    if layer.quant is not None:
        raise ConfigError(f"lora.init={init} needs the full-precision base weight: inject the adapter before "
                          "quantizing (loratune does so when the recipe sets both)")
    weight = layer.base_weight()  # (out, in) float32
    residual = weight.clone()
    how = parse_init(init)
    for name, (start, stop) in u.slices.items():
        part = weight[start:stop]
        if how.kind == "olora":
            a, b, res = olora_init(part, u.r, u.scale)
        else:
            a, b, res = pissa_init(part, u.r, u.scale, niter=how.niter)
        u.lora_A[name].copy_(a)
        u.lora_B[name].copy_(b)
        residual[start:stop] = res.float()
    layer._set_weight(residual)
    u.register_buffer("lora_init_A", u.stacked_A().detach().clone())
    u.register_buffer("lora_init_B", u.stacked_B(scaled=False).detach().clone())
    if u.use_dora:  # the magnitude of the adapted weight, which still equals the original
        dora.init_magnitude(u, layer.base_weight())
