"""Per-row adapters: one forward in which each row of the batch applies its own adapter (or none).

A serving batch mixes requests for different adapters and for the bare base. Rather than one
forward per adapter, every adapted layer keeps a *bank* of the adapters it serves: their stacked
A (R, in) and scaled B (out, R), zero-padded to the largest R, with slot 0 the empty adapter of the
bare base. A forward gathers each row's A and B by the row's slot and applies them with two batched
matmuls: the gathered-matmul idea of Punica and S-LoRA (their BGMV kernels), in plain PyTorch.

DoRA adapters serve too: at inference their magnitude scale ``g = m / ||W + s B A||`` (per output
row) is a constant, banked as ``G`` (ones for plain adapters and the base), and a row's output is
``base + (g - 1) * (W x) + g * (s B A x)``, PEFT's DoRA forward with dropout off.

Banks are built by :func:`build_banks` from the adapters a model holds (rebuild after loading or
removing one) and used inside :func:`rows_applying`, which names each row's adapter for the
forwards run in it. Everything here is inference: no gradients flow to the banks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from . import dora
from .lora import LoRALinear, lora_layers


@dataclass
class AdapterBank:
    """One layer's adapters, stacked: slot 0 is the bare base (all zeros), slot i + 1 is ``names[i]``."""

    names: list[str]
    A: torch.Tensor
    """(slots, R, in): each adapter's stacked A, zero rows past its own R."""
    B: torch.Tensor
    """(slots, out, R): each adapter's scale * stacked B, zero columns past its own R."""
    G: torch.Tensor | None
    """(slots, out): DoRA's magnitude scale per output row (1 elsewhere); None when no adapter is DoRA."""
    cast: dict = field(default_factory=dict, repr=False)
    """(A, B, G) in other dtypes, made once (a bf16 model would otherwise cast the bank at every step)."""

    def as_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.A.dtype == dtype:
            return self.A, self.B, self.G
        if dtype not in self.cast:
            self.cast[dtype] = (self.A.to(dtype), self.B.to(dtype), None if self.G is None else self.G.to(dtype))
        return self.cast[dtype]

    def delta(self, x: torch.Tensor, slots: torch.Tensor, base_no_bias: torch.Tensor | None) -> torch.Tensor:
        """What each row's adapter adds to the layer's output: x (rows, T, in) -> (rows, T, out)."""
        A, B, G = self.as_dtype(x.dtype)
        z = torch.bmm(x, A[slots].transpose(1, 2))  # (rows, T, R)
        out = torch.bmm(z, B[slots].transpose(1, 2))  # (rows, T, out)
        if G is None:
            return out
        g = G[slots][:, None, :]  # (rows, 1, out)
        return (g - 1) * base_no_bias + g * out


@torch.no_grad()
def layer_bank(layer: LoRALinear, names: Sequence[str]) -> AdapterBank:
    """The bank of ``names`` on one layer (an adapter this layer does not hold acts as the base here)."""
    updates = {n: layer.lora[n] for n in names if n in layer.lora}
    rank = max([u.stacked_A().shape[0] for u in updates.values()], default=1)
    slots = len(names) + 1
    device = layer.base_weight().device if not updates else next(iter(updates.values())).stacked_A().device
    A = torch.zeros(slots, rank, layer.in_features, device=device)
    B = torch.zeros(slots, layer.out_features, rank, device=device)
    dora_used = any(u.use_dora for u in updates.values())
    G = torch.ones(slots, layer.out_features, device=device) if dora_used else None
    w = layer.base_weight() if dora_used else None
    for i, name in enumerate(names, start=1):
        u = updates.get(name)
        if u is None:
            continue
        a, b = u.stacked_A().float(), u.stacked_B().float()
        A[i, :a.shape[0]] = a
        B[i, :, :b.shape[1]] = b
        if u.use_dora:
            G[i] = u.lora_magnitude.float() / dora.row_norms(w, b @ a)
    return AdapterBank(list(names), A, B, G)


def build_banks(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Bank ``names`` (adapters the model holds, in slot order 1..n) on every adapted layer; returns them.

    Merged adapters cannot be banked (their update is already in the weight): unmerge them first.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names repeat: {names}")
    held = set()
    for _, layer in lora_layers(model):
        if layer.merged_names:
            raise ConfigError(f"adapters {layer.merged_names} are merged into the base: unmerge them to serve per row")
        held.update(layer.lora)
    missing = [n for n in names if n not in held]
    if missing:
        raise ConfigError(f"the model holds no adapter named {', '.join(missing)}")
    for _, layer in lora_layers(model):
        layer.row_bank = layer_bank(layer, names)
    return names


@contextlib.contextmanager
def rows_applying(model: nn.Module, adapters: Sequence[str | None],
                  layers: Sequence[LoRALinear] | None = None) -> Iterator[None]:
    """Inside, forwards of ``model`` apply ``adapters[i]`` to batch row i (None: the bare base).

    The names must be banked (:func:`build_banks`). The model's own active adapters are ignored for
    these forwards. ``layers``: the model's LoRA layers, where the caller keeps them (no walk of the
    model per forward).
    """
    layers = list(layers) if layers is not None else [layer for _, layer in lora_layers(model)]
    banked = getattr(layers[0], "row_bank", None) if layers else None
    if banked is None:
        raise ConfigError("no adapter bank on this model: call build_banks(model, names) first")
    index = {name: i for i, name in enumerate(banked.names, start=1)}
    unknown = [a for a in adapters if a is not None and a not in index]
    if unknown:
        raise ConfigError(f"adapter(s) {', '.join(sorted(set(unknown)))} are not banked (banked: "
                          f"{', '.join(banked.names) or 'none'})")
    device = banked.A.device
    slots = torch.tensor([0 if a is None else index[a] for a in adapters], dtype=torch.long, device=device)
    for layer in layers:
        layer.row_slots = slots
    try:
        yield
    finally:
        for layer in layers:
            layer.row_slots = None


def row_forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear's forward while :func:`rows_applying` is on: the base plus each row's banked update."""
    out = layer._base(x)  # (rows, T, out)
    if x.dim() != 3 or x.shape[0] != layer.row_slots.shape[0]:
        raise ConfigError(f"per-row adapters name {layer.row_slots.shape[0]} rows, but the input is {tuple(x.shape)}")
    bank = layer.row_bank
    base_no_bias = None
    if bank.G is not None:
        bias = layer.quant.bias if layer.quant is not None else layer.bias
        base_no_bias = out if bias is None else out - bias.to(out.dtype)
    return out + bank.delta(x, layer.row_slots, base_no_bias).to(out.dtype)

