"""How a LoRA adapter's A and B start: PEFT's ``init_lora_weights`` choices, as tensor functions and on layers.

- ``default``: A Kaiming-uniform (a=sqrt(5), as nn.Linear), B = 0: the update starts at zero.
- ``gaussian``: A ~ N(0, (1/r)^2) (std 1/r, PEFT's choice), B = 0.
- ``pissa`` (Meng et al., 2024): A and B hold the weight's top-r singular triplets,
  ``B = U_r sqrt(S_r / scale)``, ``A = sqrt(S_r / scale) V_r^T``, and the frozen base becomes the
  residual ``W - scale * B A``, so the model's output is unchanged at init but training moves the
  principal directions. ``pissa_niter_<K>`` uses torch's randomized SVD (Halko et al., K power
  iterations): much faster on large weights, and random (it draws from torch's global RNG).
- ``olora`` (Büyükakyüz, 2024): ``W = Q R``; B = Q[:, :r], A = R[:r], residual ``W - scale * B A``.

PiSSA and OLoRA change the base weight, so their trained adapter only works on the residual base.
:func:`to_plain_lora` turns it into an ordinary LoRA adapter of rank 2r on the *original* base, as
PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does.

:func:`initialise` applies a start to the layers of a freshly injected adapter. Each slice of a fused
projection (GPT-2's q and v of ``c_attn``) is decomposed on its own rows. The starting A and B are
kept as buffers (``lora_init_A``, ``lora_init_B``) for :func:`to_plain_lora` at save time. Under QLoRA
the residual is what gets quantized (the model is quantized after injection).

Every tensor function takes the weight as ``(out, in)``. For a transposed (fan_in_fan_out, GPT-2 Conv1D
``(in, out)``) weight the caller passes ``weight.t()`` and transposes the residual back, as PEFT does.
The arithmetic is float32 (the weight is upcast); A and B come back float32 (the trainable masters),
the residual in the weight's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

INIT_NAMES = ("default", "gaussian", "pissa", "pissa_niter_<K>", "olora")
"""The accepted values of an init name (K a non-negative integer)."""

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoRAInit:
    """A parsed init name: ``kind`` is default, gaussian, pissa or olora; ``niter`` the power
    iterations of randomized-SVD PiSSA (None: full SVD)."""

    kind: str
    niter: int | None = None

    @property
    def changes_base(self) -> bool:
        """Whether this init replaces the base weight by a residual (PiSSA, OLoRA)."""
        return self.kind in ("pissa", "olora")


def parse_init(name: str) -> LoRAInit:
    """Validate an init name ("default", "gaussian", "pissa", "pissa_niter_<K>", "olora")."""
    if isinstance(name, str):
        if name in ("default", "gaussian", "pissa", "olora"):
            return LoRAInit(name)
        match = re.fullmatch(r"pissa_niter_(\d+)", name)
        if match:
            return LoRAInit("pissa", int(match.group(1)))
    raise ConfigError(f"unknown LoRA init {name!r}: use one of {', '.join(INIT_NAMES)} "
                      "(K: power iterations of the randomized SVD, e.g. pissa_niter_4)")


def gaussian_init(r: int, in_features: int, out_features: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``gaussian``: A (r, in) ~ N(0, std=1/r), B (out, r) = 0, float32.

    Draws from ``generator`` (torch's global RNG when None) exactly as ``nn.init.normal_`` on the
    A matrix does, so the same seed gives PEFT's A.
    """
    a = torch.empty(r, in_features, dtype=torch.float32)
    nn.init.normal_(a, std=1 / r, generator=generator)
    return a, torch.zeros(out_features, r, dtype=torch.float32)


def _float_weight(weight: torch.Tensor, r: int, method: str) -> torch.Tensor:
    if weight.dim() != 2:
        raise ConfigError(f"{method} needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"{method} needs a float32, float16 or bfloat16 weight, got {weight.dtype}: initialise "
                          "on the float weight, then quantize the residual")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= min(weight.shape):
        raise ConfigError(f"{method} rank must be in 1..min(out, in) = {min(weight.shape)} for a weight of shape "
                          f"{tuple(weight.shape)}, got {r!r}: lower lora.r or leave this layer out")
    return weight.detach().to(torch.float32)


def pissa_init(weight: torch.Tensor, r: int, scale: float,
               niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's ``pissa`` (full SVD, ``niter`` None) or ``pissa_niter_<niter>`` (torch.svd_lowrank).

    Returns A (r, in) and B (out, r) in float32 and the residual ``W - scale * B A`` (out, in) in
    the weight's dtype; ``residual + scale * B A`` is W up to float32 rounding (and the residual's
    rounding to a low-precision dtype). The randomized SVD draws from torch's global RNG.
    """
    w = _float_weight(weight, r, "PiSSA")  # (out, in)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        u_r, s_r, vh_r = u[:, :r], s[:r] / scale, vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=niter)  # (out, r), (r,), (in, r)
        s_r, vh_r = s_r / scale, v_r.t()
    a = torch.diag(torch.sqrt(s_r)) @ vh_r  # (r, in)
    b = u_r @ torch.diag(torch.sqrt(s_r))  # (out, r)
    residual = w - scale * b @ a
    return a, b, residual.to(weight.dtype)


def olora_init(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's ``olora``: ``W = Q R`` (reduced QR), B = Q[:, :r] (out, r), A = R[:r] (r, in), float32;
    residual ``W - scale * B A`` in the weight's dtype (B A is W's rank-r part only when scale is 1:
    PEFT does not divide by the scale here, unlike PiSSA)."""
    w = _float_weight(weight, r, "OLoRA")  # (out, in)
    q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
    b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    residual = w - scale * b @ a
    return a, b, residual.to(weight.dtype)


def to_plain_lora(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, r: int, alpha: float,
                  rslora: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Convert a trained PiSSA/OLoRA adapter into a plain LoRA adapter on the original base weight.

    With ``W = W_res + s B0 A0`` at init and ``W_res + s B A`` after training, the change to W is
    ``s (B A - B0 A0) = s [B | -B0] [A ; A0]``: A' = cat(A, A0) (2r, in), B' = cat(B, -B0) (out, 2r),
    as PEFT's ``subtract_mutated_init`` builds it. The rank doubles; alpha becomes 2 alpha (alpha * sqrt(2)
    with rslora) so that the scale ``s`` is unchanged, as PEFT writes it in adapter_config.json.
    Returns (A', B', r', alpha').
    """
    if a.shape != a0.shape or b.shape != b0.shape or a.shape[0] != r or b.shape[1] != r:
        raise ConfigError(f"to_plain_lora needs A, A0 of shape (r={r}, in) and B, B0 of shape (out, r); got "
                          f"A {tuple(a.shape)}, A0 {tuple(a0.shape)}, B {tuple(b.shape)}, B0 {tuple(b0.shape)}: "
                          "pass the adapter's initial A and B saved before training")
    a_plain = torch.cat([a, a0.to(a.dtype)], dim=0)  # (2r, in)
    b_plain = torch.cat([b, -b0.to(b.dtype)], dim=1)  # (out, 2r)
    alpha_plain = alpha * 2 ** 0.5 if rslora else 2 * alpha  # PEFT's arithmetic, bit for bit
    return a_plain, b_plain, 2 * r, alpha_plain


def initialise(layers: Iterable[nn.Module], init: str, adapter: str) -> None:
    """Set adapter ``adapter``'s starting A and B for init ``init`` (and the residual base) on every layer
    that has it: :class:`~.lora.LoRALinear` layers (:func:`~.targets.inject_lora` passes a model's; lora.py
    imports this module, so the type is not imported back)."""
    if init == "default":
        return
    for layer in layers:
        if adapter in layer.lora:
            _initialise_layer(layer, init, adapter)


@torch.no_grad()
def _initialise_layer(layer: nn.Module, init: str, adapter: str) -> None:
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
    u.start(layer)  # a variant's own state (DoRA's magnitude) from the adapted weight, which still equals the original
