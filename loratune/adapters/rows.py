"""Per-row adapters: one forward in which each row of the batch applies its own adapter (or none).

A serving batch mixes requests for different adapters and for the bare base. Rather than one
forward per adapter, every adapted layer has a *bank* of the adapters served: their stacked A
(R, in) and scaled B (out, R) in numbered slots, zero-padded to the largest R, with slot 0 the empty
adapter of the bare base. A forward gathers each row's A and B by the row's slot and applies them
with two batched matmuls: the gathered-matmul idea of Punica and S-LoRA (their BGMV kernels), in
plain PyTorch.

The banks are serving state, so they live here and not on the training layer (as vLLM keeps its
stacked LoRA weights in its serving layers, apart from PEFT's modules): a :class:`RowBanks` holds
one :class:`AdapterBank` per :class:`~.lora.LoRALinear` of a model and reaches the layers' forwards
through a forward hook, which does nothing until :meth:`RowBanks.applying` names each row's adapter.
Loading an adapter writes its slot in every layer (:meth:`RowBanks.write`) and evicting zeroes it
(:meth:`RowBanks.evict`); the other slots' tensors are left as they are. Only an adapter of a higher
rank than a layer's bank holds grows that layer's bank.

Variants serve too: a variant's inference-time scale per output row (DoRA's ``m / ||W + s B A||``,
:meth:`~.update.LoRAUpdate.bank_scale`) is banked as ``G`` (ones for plain adapters and the base),
and a row's output is ``base + (g - 1) * (W x) + g * (s B A x)``. Everything here is inference: no
gradients flow to the banks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .lora import LoRALinear, lora_layers


@dataclass
class AdapterBank:
    """One layer's served adapters, stacked by slot: slot 0 is the bare base (all zeros)."""

    A: torch.Tensor
    """(slots, R, in): each adapter's stacked A, zero rows past its own R."""
    B: torch.Tensor
    """(slots, out, R): each adapter's scale * stacked B, zero columns past its own R."""
    G: torch.Tensor | None = None
    """(slots, out): a variant's scale per output row (1 elsewhere); None while no adapter here has one."""
    cast: dict = field(default_factory=dict, repr=False)
    """(A, B, G) in other dtypes, made once (a bf16 model would otherwise cast the bank at every step)."""

    def as_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.A.dtype == dtype:
            return self.A, self.B, self.G
        if dtype not in self.cast:
            self.cast[dtype] = (self.A.to(dtype), self.B.to(dtype), None if self.G is None else self.G.to(dtype))
        return self.cast[dtype]

    @torch.no_grad()
    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, g: torch.Tensor | None) -> None:
        """Put one adapter's stacked A (R, in), scaled B (out, R) and scale g (out,) in ``slot`` (None: empty it).
        Only this slot changes, here and in the cast copies, unless A's rank outgrows the bank (it grows)."""
        if a is not None and a.shape[0] > self.A.shape[1]:
            self._grow_rank(a.shape[0])
        if g is not None and self.G is None:
            self.G = torch.ones(self.A.shape[0], self.B.shape[1], device=self.A.device)
            self.cast.clear()
        for A, B, G in [(self.A, self.B, self.G), *self.cast.values()]:
            A[slot].zero_()
            B[slot].zero_()
            if a is not None:
                A[slot, :a.shape[0]] = a
                B[slot, :, :b.shape[1]] = b
            if G is not None:
                G[slot] = 1.0 if g is None else g

    def _grow_rank(self, rank: int) -> None:
        A = self.A.new_zeros(self.A.shape[0], rank, self.A.shape[2])
        B = self.B.new_zeros(self.B.shape[0], self.B.shape[1], rank)
        A[:, :self.A.shape[1]] = self.A
        B[:, :, :self.B.shape[2]] = self.B
        self.A, self.B = A, B
        self.cast.clear()

    def delta(self, x: torch.Tensor, slots: torch.Tensor, base_no_bias: torch.Tensor | None) -> torch.Tensor:
        """What each row's adapter adds to the layer's output: x (rows, T, in) -> (rows, T, out)."""
        A, B, G = self.as_dtype(x.dtype)
        z = torch.bmm(x, A[slots].transpose(1, 2))  # (rows, T, R)
        out = torch.bmm(z, B[slots].transpose(1, 2))  # (rows, T, out)
        if G is None:
            return out
        g = G[slots][:, None, :]  # (rows, 1, out)
        return (g - 1) * base_no_bias + g * out


_BANKS: weakref.WeakKeyDictionary[nn.Module, "RowBanks"] = weakref.WeakKeyDictionary()
"""The banks serving a model (at most one set per model), found by :func:`row_banks`."""


def row_banks(model: nn.Module) -> "RowBanks | None":
    """The banks serving ``model`` (:class:`RowBanks`), or None."""
    return _BANKS.get(model)


class RowBanks:
    """The banks of every LoRA layer of ``model``, ``slots`` adapters each (more slots are added when needed).

    Creating one replaces the model's previous banks. The adapters banked must be held by the model's
    layers (loaded, not merged); :meth:`write` copies one into a free slot, :meth:`evict` empties its slot.
    """

    def __init__(self, model: nn.Module, slots: int) -> None:
        old = _BANKS.get(model)
        if old is not None:
            old.close()
        self._model, self.capacity = weakref.ref(model), max(1, slots)  # weak: the model holds the hooks
        self.slot_of: dict[str, int] = {}
        """Banked adapter -> its slot (1..capacity)."""
        self.banks: dict[LoRALinear, AdapterBank] = {}
        self._hooks: list = []
        self.slots: torch.Tensor | None = None
        """Each row's slot while :meth:`applying` is on; None otherwise (the hooks then do nothing)."""
        _BANKS[model] = self
        self._cover()

    @property
    def names(self) -> list[str]:
        """The banked adapters in slot order."""
        return sorted(self.slot_of, key=self.slot_of.get)

    def close(self) -> None:
        """Detach from the model: its forwards no longer see these banks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.banks = [], {}
        model = self._model()
        if model is not None and _BANKS.get(model) is self:
            del _BANKS[model]

    def _cover(self) -> None:
        """A bank (empty slots) and a hook for every LoRA layer the model has and the banks lack yet (a load
        may wrap more layers)."""
        for _, layer in lora_layers(self._model()):
            if layer in self.banks:
                continue
            if layer.merged_names:
                raise ConfigError(f"adapters {layer.merged_names} are merged into the base: unmerge them to serve "
                                  "per row")
            device = layer.weight.device if layer.quant is None else layer.quant.device
            slots = self.capacity + 1
            self.banks[layer] = AdapterBank(torch.zeros(slots, 1, layer.in_features, device=device),
                                            torch.zeros(slots, layer.out_features, 1, device=device))
            self._hooks.append(layer.register_forward_hook(self._hook))

    @torch.no_grad()
    def write(self, name: str) -> int:
        """Bank adapter ``name`` (held by the model's layers) in a free slot of every layer; returns the slot."""
        if name in self.slot_of:
            raise ConfigError(f"adapter {name!r} is already banked")
        self._cover()
        layers = [layer for layer in self.banks if name in layer.lora]
        if not layers:
            raise ConfigError(f"the model holds no adapter named {name}")
        merged = [layer.merged_names for layer in layers if layer.merged_names]
        if merged:
            raise ConfigError(f"adapters {merged[0]} are merged into the base: unmerge them to serve per row")
        free = [s for s in range(1, self.capacity + 1) if s not in self.slot_of.values()]
        if not free:
            self._add_slot()
            free = [self.capacity]
        slot = free[0]
        for layer in layers:
            u = layer.lora[name]
            self.banks[layer].write(slot, u.stacked_A().float(), u.stacked_B().float(), u.bank_scale(layer))
        self.slot_of[name] = slot
        return slot

    def evict(self, name: str) -> None:
        """Empty adapter ``name``'s slot in every layer (the slot then serves the next adapter written)."""
        slot = self.slot_of.pop(name)
        for bank in self.banks.values():
            bank.write(slot, None, None, None)

    def sync(self, names: Sequence[str]) -> None:
        """Evict the banked adapters not in ``names`` and write those in it not banked yet (slot by slot)."""
        for name in [n for n in self.slot_of if n not in names]:
            self.evict(name)
        for name in names:
            if name not in self.slot_of:
                self.write(name)

    def _add_slot(self) -> None:
        self.capacity += 1
        for bank in self.banks.values():
            bank.A = torch.cat([bank.A, torch.zeros_like(bank.A[:1])])
            bank.B = torch.cat([bank.B, torch.zeros_like(bank.B[:1])])
            bank.G = None if bank.G is None else torch.cat([bank.G, torch.ones_like(bank.G[:1])])
            bank.cast.clear()

    @contextlib.contextmanager
    def applying(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Inside, forwards of the model apply ``adapters[i]`` to batch row i (None: the bare base); the
        model's own active adapters are ignored for these forwards."""
        unknown = [a for a in adapters if a is not None and a not in self.slot_of]
        if unknown:
            raise ConfigError(f"adapter(s) {', '.join(sorted(set(unknown)))} are not banked (banked: "
                              f"{', '.join(self.names) or 'none'})")
        if not self.banks:
            raise ConfigError("no adapter bank on this model: call build_banks(model, names) first")
        layers = list(self.banks)
        device = next(iter(self.banks.values())).A.device
        self.slots = torch.tensor([0 if a is None else self.slot_of[a] for a in adapters], dtype=torch.long,
                                  device=device)
        enabled = [layer.enabled for layer in layers]
        for layer in layers:
            layer.enabled = False  # the layer computes its base only; the hook adds each row's adapter
        try:
            yield
        finally:
            self.slots = None
            for layer, was in zip(layers, enabled):
                layer.enabled = was

    def _hook(self, layer: LoRALinear, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        """The layer's forward while :meth:`applying` is on: its base output plus each row's banked update."""
        if self.slots is None:
            return None
        x = args[0]
        if x.dim() != 3 or x.shape[0] != self.slots.shape[0]:
            raise ConfigError(f"per-row adapters name {self.slots.shape[0]} rows, but the input is {tuple(x.shape)}")
        bank = self.banks[layer]
        base_no_bias = None
        if bank.G is not None:
            bias = layer.base_bias()
            base_no_bias = out if bias is None else out - bias.to(out.dtype)
        return out + bank.delta(x, self.slots, base_no_bias).to(out.dtype)


def build_banks(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Bank ``names`` (adapters the model holds) in slots 1..n of every adapted layer; returns them.

    Merged adapters cannot be banked (their update is already in the weight): unmerge them first.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names repeat: {names}")
    held = {n for _, layer in lora_layers(model) for n in layer.lora}
    missing = [n for n in names if n not in held]
    if missing:
        raise ConfigError(f"the model holds no adapter named {', '.join(missing)}")
    banks = RowBanks(model, len(names))
    for name in names:
        banks.write(name)
    return names


def rows_applying(model: nn.Module, adapters: Sequence[str | None]) -> contextlib.AbstractContextManager[None]:
    """Inside, forwards of ``model`` apply ``adapters[i]`` to batch row i (None: the bare base); the names
    must be banked (:func:`build_banks`)."""
    banks = row_banks(model)
    if banks is None:
        raise ConfigError("no adapter bank on this model: call build_banks(model, names) first")
    return banks.applying(adapters)
