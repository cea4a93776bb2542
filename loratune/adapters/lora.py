"""The LoRA layer: a frozen linear weight plus trainable low-rank updates, one per named adapter.

``out = x W^T + b + scale * B(A(dropout(x)))`` with ``A`` (r x in) Kaiming-uniform and ``B``
(out x r) zero, so a freshly injected adapter leaves the model's output unchanged.

The layer *owns* the frozen ``weight`` and ``bias`` under their original names (the torchtune
way), so a base checkpoint loads into an adapted model without key surgery; under QLoRA the
base lives in ``quant`` (4-bit NF4, dequantized on the fly) instead. One layer can adapt the
whole projection or only some output slices of a fused one (GPT-2's ``c_attn`` holds q, k and
v; the tutorial adapts only q and v): each slice gets its own A and B (:mod:`.update`).

Several adapters can sit on one base (``lora[name]``, as PEFT's ``lora_A[adapter_name]``);
``active`` names the ones forward applies. With a single active adapter the layer's ``r``,
``scale``, ``lora_A`` ... are that adapter's.

Merging is explicit (:meth:`LoRALinear.merge` / :meth:`LoRALinear.unmerge`), computed in
float32 and cast back, and refuses non-finite updates. What an adapter adds in forward and how it
merges and unmerges is its update's to say (:mod:`.update`: plain LoRA, or a variant such as
:mod:`.dora`), so this layer holds no method-specific branch. Serving many adapters per row is not
this layer's state either: the banks live beside the model (:mod:`.rows`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MergeError
from .init import parse_init
from .update import WHOLE, LoRAUpdate, lora_scale
from .variants import flagged, variant_class




@dataclass
class LoRAConfig:
    """What to adapt and how: rank, scaling, dropout and target names."""

    r: int = 4
    """Rank of the update (the tutorial uses 4)."""
    alpha: float = 32.0
    """Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    """Target names: model aliases (q, k, v, qkv, attn.out, mlp.fc, mlp.proj), module-name
    suffixes, 'all-linear', or 're:<regex>' matched against full module names."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)."""
    use_dora: bool = False
    """DoRA: a trainable magnitude per output row times the normalised adapted weight (Liu et al., 2024)."""
    init: str = "default"
    """A and B at the start: default (Kaiming A, zero B), gaussian, pissa, pissa_niter_<K> (fast
    randomized SVD), olora; pissa and olora move the top of the base weight into the adapter."""
    plus_ratio: float | None = None
    """LoRA+: B's learning rate = plus_ratio x A's (Hayou et al., 2024 suggest 16); None = same lr."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("lora.targets is empty: name at least one target, e.g. ['q', 'v']")
        if not isinstance(self.init, str):
            raise ConfigError(f"lora.init must be a name such as 'pissa', got {self.init!r}")
        parse_init(self.init)
        if self.plus_ratio is not None and (isinstance(self.plus_ratio, bool) or not isinstance(
                self.plus_ratio, (int, float)) or not math.isfinite(self.plus_ratio) or self.plus_ratio <= 0):
            raise ConfigError(f"lora.plus_ratio must be a positive number (LoRA+ suggests 16) or null, "
                              f"got {self.plus_ratio!r}")

    @property
    def scale(self) -> float:
        """The factor applied to B(A(x))."""
        return lora_scale(self.r, self.alpha, self.rslora)

    @property
    def variant(self) -> str:
        """The adapter variant its flags name (:mod:`.variants`): ``lora``, or ``dora`` with use_dora."""
        return flagged(vars(self))


class LoRALinear(nn.Module):
    """A frozen linear projection with LoRA updates (one per named adapter) on its output or named slices.

    Args:
        weight: the frozen base weight, ``(out, in)``; ``(in, out)`` when ``fan_in_fan_out``
            (GPT-2's Conv1D layout in transformers). None when ``quant`` holds the base.
        bias: the frozen base bias or None.
        r, alpha, dropout, rslora: the first adapter's settings, see :class:`LoRAConfig`
            (``r`` None: start without an adapter).
        variant: the first adapter's variant (:mod:`.variants`: ``lora``, ``dora``).
        slices: output slices to adapt, ``{name: (start, stop)}``; None adapts the whole output.
        fan_in_fan_out: whether ``weight`` is stored transposed.
        adapter: the first adapter's name.
        quant: a quantized frozen base (:class:`~loratune.quant.linear.NF4Linear`) instead of ``weight``.
    """

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, r: int | None, alpha: float = 1.0,
                 dropout: float = 0.0, rslora: bool = False, slices: dict[str, tuple[int, int]] | None = None,
                 fan_in_fan_out: bool = False, adapter: str = "default", variant: str = "lora",
                 quant: nn.Module | None = None) -> None:
        super().__init__()
        self.weight, self.bias, self.quant = weight, bias, quant
        self.fan_in_fan_out = fan_in_fan_out
        if quant is not None:
            self.in_features, self.out_features = int(quant.in_features), int(quant.out_features)
        else:
            out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
            self.in_features, self.out_features = int(in_features), int(out_features)
        self.lora = nn.ModuleDict()
        self.active: list[str] = []
        self.merged_names: list[str] = []
        self._undo: dict[str, object] = {}  # per merged adapter, what its variant needs to unmerge it
        self.enabled = True
        if r is not None:  # None: no adapter yet (a loaded one is put in ``lora`` by the caller)
            self.add_adapter(adapter, r, alpha, dropout, rslora, slices, variant)
            self.active = [adapter]

    @classmethod
    def wrap(cls, base: nn.Module, cfg: LoRAConfig, slices=None, fan_in_fan_out: bool = False,
             adapter: str = "default") -> "LoRALinear":
        """Build a LoRA layer that takes over ``base``'s weight and bias (no copy), or its quantized storage."""
        if getattr(base, "is_quantized", False):
            return cls(None, None, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, slices, False, adapter, cfg.variant,
                       quant=base)
        return cls(base.weight, base.bias, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, slices, fan_in_fan_out,
                   adapter, cfg.variant)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    slices: dict[str, tuple[int, int]] | None = None, variant: str = "lora") -> LoRAUpdate:
        """Add adapter ``name`` (not active until :meth:`set_active` names it); returns its update."""
        if name in self.lora:
            raise ConfigError(f"this layer already has an adapter named {name!r}: pick another name")
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {r}")
        spans = dict(slices) if slices else {WHOLE: (0, self.out_features)}
        for part, (start, stop) in spans.items():
            if not 0 <= start < stop <= self.out_features:
                raise ConfigError(f"LoRA slice {part!r}=({start}, {stop}) is outside 0..{self.out_features}")
        device = self.quant.device if self.quant is not None else self.weight.device
        update = variant_class(variant)(self.in_features, self.out_features, r, alpha, dropout, rslora, slices,
                                        device=device)
        update.start(self)
        self.lora[name] = update
        return update

    def set_active(self, names: list[str]) -> None:
        """Apply these adapters in forward, in this order; the model-wide list, so names this layer lacks
        are skipped (as in PEFT, where an adapter may target other layers)."""
        if self.merged_names:
            raise MergeError("cannot switch adapters while some are merged: unmerge first")
        self.active = list(names)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerge it first)."""
        if name in self.merged_names:
            raise MergeError(f"adapter {name!r} is merged: unmerge it before deleting it")
        del self.lora[name]
        self.active = [n for n in self.active if n != name]

    def update(self, name: str | None = None) -> LoRAUpdate:
        """Adapter ``name``'s update, or the one active adapter's."""
        if name is not None:
            return self.lora[name]
        present = self.present()
        if len(present) != 1:
            raise ConfigError(f"{len(present)} adapters are active on this layer ({', '.join(present) or 'none'}): "
                              "name the one you mean")
        return self.lora[present[0]]

    def present(self) -> list[str]:
        """The active adapters this layer holds, in order."""
        return [n for n in self.active if n in self.lora]

    # the single active adapter's settings and tensors (what one-adapter code reads)
    r = property(lambda self: self.update().r)
    alpha = property(lambda self: self.update().alpha)
    rslora = property(lambda self: self.update().rslora)
    scale = property(lambda self: self.update().scale)
    slices = property(lambda self: self.update().slices)
    lora_A = property(lambda self: self.update().lora_A)
    lora_B = property(lambda self: self.update().lora_B)

    def stacked_A(self) -> torch.Tensor:
        return self.update().stacked_A()

    def stacked_B(self, scaled: bool = True) -> torch.Tensor:
        return self.update().stacked_B(scaled)

    def delta_weight(self) -> torch.Tensor:
        return self.update().delta_weight()

    @property
    def merged(self) -> bool:
        """Whether some adapter is folded into the base weight."""
        return bool(self.merged_names)

    def extra_repr(self) -> str:
        quant = ", quantized" if self.quant is not None else ""
        return (f"in={self.in_features}, out={self.out_features}, active={','.join(self.active) or '-'}, "
                f"merged={','.join(self.merged_names) or '-'}{quant}")

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frozen base weight as an (out, in) tensor in ``dtype`` (dequantized under QLoRA)."""
        if self.quant is not None:
            return self.quant.dequantized_weight(dtype)
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        return w.to(dtype)

    def base_bias(self) -> torch.Tensor | None:
        """The frozen base bias (the quantized base's under QLoRA), or None."""
        return self.quant.bias if self.quant is not None else self.bias

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant(x)
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)  # (..., out)
        if not self.enabled:
            return out
        for name in self.present():
            if name not in self.merged_names:
                out = out + self.lora[name].added(self, x, out)  # its variant says what it adds
        return out

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold the active adapters (or ``names``) into the base weight (float32 math, cast back);
        forward then skips them. Quantized bases are dequantized first (:func:`~loratune.quant.dequantize_model`)."""
        names = list(self.present() if names is None else names)
        if not names or all(n in self.merged_names for n in names):
            raise MergeError("adapter is already merged" if names else "no active adapter to merge")
        if self.quant is not None:
            raise MergeError("cannot merge into a quantized base: dequantize the model first "
                             "(loratune.quant.dequantize_model), then merge in float32")
        for name in names:
            if name in self.merged_names:
                continue
            u = self.lora[name]
            delta = u.delta_weight()
            if not u.finite(delta):
                raise MergeError("refusing to merge: the LoRA update contains NaN or Inf values")
            merged, self._undo[name] = u.merged_weight(self.base_weight(), delta)
            self._set_weight(merged)
            self.merged_names.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged updates again (last merged first), restoring the base weight up to rounding."""
        if not self.merged_names:
            raise MergeError("adapter is not merged")
        for name in reversed(self.merged_names):
            self._set_weight(self.lora[name].unmerged_weight(self.base_weight(), self._undo.pop(name)))
        self.merged_names = []

    def _set_weight(self, weight: torch.Tensor) -> None:
        """Write an (out, in) float32 weight back in the stored layout and dtype."""
        self.weight.copy_((weight.t() if self.fan_in_fan_out else weight).to(self.weight.dtype))

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """All LoRA layers of a model with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer into its base weight; returns how many were merged."""
    layers = [m for _, m in lora_layers(model) if not m.merged and m.present()]  # an adapter may target other layers
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`; returns how many layers were unmerged."""
    layers = [m for _, m in lora_layers(model) if m.merged]
    for m in layers:
        m.unmerge()
    return len(layers)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone for a while (e.g. to compare with and without the adapter).

    Refuses merged adapters, whose update is already inside the weight.
    """
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise MergeError("cannot disable merged adapters: unmerge first")
    previous = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.enabled = was
