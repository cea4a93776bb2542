"""One rule for what trains, and one report of it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .lora import lora_layers


def set_trainable(model: nn.Module, finetune: str = "lora") -> None:
    """Decide which parameters get gradients.

    ``lora``: only the active adapters' A and B matrices (and DoRA magnitudes); the base and any
    other loaded adapter are frozen (error if there is no adapter).
    ``full``: every parameter (classic full fine-tuning).
    """
    if finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    if finetune != "lora":
        raise ConfigError(f"finetune must be 'lora' or 'full', got {finetune!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = list(lora_layers(model))
    if not layers:
        raise ConfigError("finetune='lora' but the model has no LoRA layers: inject an adapter first")
    for _, layer in layers:  # the active adapters train; other loaded ones stay frozen
        for name in layer.present():
            for p in layer.lora[name].trainable():
                p.requires_grad_(True)


@dataclass(frozen=True)
class ParamReport:
    """Trainable and total parameter counts (tied weights counted once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable: {self.trainable:,} / {self.total:,} ({self.percent:.2f}%)"


def parameter_report(model: nn.Module) -> ParamReport:
    """Count trainable vs. all parameters; ``model.parameters()`` yields shared tensors once, and a quantized
    base's weights (buffers, not parameters) count as the parameters they stand for."""
    params = list(model.parameters())
    quantized = sum(m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
                    for m in model.modules() if getattr(m, "is_quantized", False))
    return ParamReport(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized)
