"""Rotary position embeddings with the scalings published configs use.

``rope_type`` default, linear, dynamic (NTK), llama3, yarn and longrope, computed as transformers
computes them (``modeling_rope_utils``), so the same positions give the same angles bit for bit
in float32. A config's rope settings come either as transformers 5's ``rope_parameters`` or as
the older ``rope_theta`` + ``rope_scaling`` pair that most hub checkpoints still carry;
:func:`rope_from_hf` reads both and names any type or field it cannot honour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..errors import CheckpointError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class Rope:
    """One attention type's rotary settings (field names as in transformers' rope_parameters)."""

    rope_theta: float = 10000.0
    """Base wavelength."""
    rope_type: str = "default"
    """One of ROPE_TYPES."""
    factor: float | None = None
    """Context stretch (linear, dynamic, llama3, yarn; longrope derives it when absent)."""
    partial_rotary_factor: float = 1.0
    """Share of each head's dimensions that rotate (Phi-4-mini: 0.75); the rest pass through."""
    original_max_position_embeddings: int | None = None
    """Pre-training context (llama3, yarn, longrope)."""
    low_freq_factor: float | None = None
    """llama3: wavelengths above original/low_freq_factor are divided by factor."""
    high_freq_factor: float | None = None
    """llama3: wavelengths below original/high_freq_factor are kept."""
    beta_fast: float | None = None
    """yarn: extrapolation boundary (default 32)."""
    beta_slow: float | None = None
    """yarn: interpolation boundary (default 1)."""
    mscale: float | None = None
    """yarn: attention-factor numerator scale."""
    mscale_all_dim: float | None = None
    """yarn: attention-factor denominator scale."""
    attention_factor: float | None = None
    """yarn/longrope: explicit cos/sin scale (derived from factor when absent)."""
    truncate: bool = True
    """yarn: round the correction range to whole dimensions."""
    short_factor: tuple[float, ...] | None = None
    """longrope: per-frequency divisors within the original context."""
    long_factor: tuple[float, ...] | None = None
    """longrope: per-frequency divisors beyond it."""


_NUMBER_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
                  "mscale_all_dim", "attention_factor")
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
             "yarn": ("factor",), "longrope": ("short_factor", "long_factor")}


def positive(value: Any, name: str, where: str = "") -> float:
    """A positive finite number from config.json (``where``: the dict it sits in), else a CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise CheckpointError(f"config.json: {where}{name} must be a positive number, got {value!r}")
    return float(value)


def rope_from_hf(params: dict[str, Any] | None, theta: Any, max_positions: int, where: str = "rope_scaling.") -> Rope:
    """A :class:`Rope` from one rope dict (``rope_parameters`` or ``rope_scaling``) and a fallback theta.

    Unknown rope types and missing or malformed fields are a CheckpointError naming them.
    """
    params = dict(params or {})
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"config.json: {where}rope_type {rope_type!r} is not supported (loratune implements "
                              f"{', '.join(ROPE_TYPES)}); loading it would give a different model")
    kwargs: dict[str, Any] = {"rope_type": rope_type,
                              "rope_theta": positive(params.pop("rope_theta", theta), "rope_theta", where)}
    for name in _REQUIRED.get(rope_type, ()):
        if params.get(name) is None:
            raise CheckpointError(f"config.json: {where}{name} is required for rope_type {rope_type!r}")
    for name in _NUMBER_FIELDS:
        if params.get(name) is not None:
            kwargs[name] = positive(params.pop(name), name, where)
    prf = params.pop("partial_rotary_factor", None)
    if prf is not None:
        kwargs["partial_rotary_factor"] = positive(prf, "partial_rotary_factor", where)
        if kwargs["partial_rotary_factor"] > 1:
            raise CheckpointError(f"config.json: {where}partial_rotary_factor must be at most 1, got {prf!r}")
    original = params.pop("original_max_position_embeddings", None)
    if rope_type in ("llama3", "yarn", "longrope"):
        original = max_positions if original is None else original
    if original is not None:
        kwargs["original_max_position_embeddings"] = int(positive(original, "original_max_position_embeddings", where))
    if "truncate" in params:
        kwargs["truncate"] = bool(params.pop("truncate"))
    for name in ("short_factor", "long_factor"):
        value = params.pop(name, None)
        if value is not None:
            if not isinstance(value, list) or not value:
                raise CheckpointError(f"config.json: {where}{name} must be a list of numbers")
            kwargs[name] = tuple(positive(v, name, where) for v in value)
    return Rope(**kwargs)


def rotary_dim(rope: Rope, head_dim: int) -> int:
    """How many of a head's dimensions rotate."""
    return int(head_dim * rope.partial_rotary_factor)


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def inv_freq(rope: Rope, head_dim: int, max_positions: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (dim/2,) float32, cos/sin scale) for sequences of ``seq_len`` positions.

    ``seq_len`` matters for dynamic (which stretches beyond ``max_positions``) and longrope (which
    switches to its long factors beyond the original context), as in transformers.
    """
    dim, base, t = rotary_dim(rope, head_dim), rope.rope_theta, rope.rope_type
    if t == "default":
        return _base_inv_freq(base, dim), 1.0
    if t == "linear":
        return _base_inv_freq(base, dim) / rope.factor, 1.0
    if t == "dynamic":
        seq_len = max(seq_len, max_positions)
        base = base * ((rope.factor * seq_len / max_positions) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if t == "llama3":
        return _llama3(rope, dim), 1.0
    if t == "yarn":
        return _yarn(rope, dim, max_positions)
    return _longrope(rope, dim, max_positions, seq_len)


def _llama3(rope: Rope, dim: int) -> torch.Tensor:
    inv = _base_inv_freq(rope.rope_theta, dim)
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: Rope, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.rope_theta, rope.factor
    original = rope.original_max_position_embeddings
    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = float(_mscale(factor, rope.mscale) / _mscale(factor, rope.mscale_all_dim))
        else:
            attention = _mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention


def _longrope(rope: Rope, dim: int, max_positions: int, seq_len: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_positions / original
    attention = rope.attention_factor
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = rope.long_factor if seq_len > original else rope.short_factor
    if len(ext) != dim // 2:
        raise CheckpointError(f"config.json: rope long_factor/short_factor have {len(ext)} entries; the rotary "
                              f"dimension {dim} needs {dim // 2}")
    ext_factors = torch.tensor(ext, dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * rope.rope_theta ** exponents), attention


@lru_cache(maxsize=64)
def _cached_inv_freq(rope: Rope, head_dim: int, max_positions: int, seq_len: int) -> tuple[torch.Tensor, float]:
    return inv_freq(rope, head_dim, max_positions, seq_len)


def rope_cos_sin(rope: Rope, head_dim: int, max_positions: int, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, rotary dim) for integer ``positions`` (B, T), computed in float32.

    The frequencies are computed once per rope (and, for dynamic and longrope, per sequence
    length), not at every decoding step.
    """
    seq_len = int(positions.max()) + 1 if positions.numel() else 0
    if rope.rope_type not in ("dynamic", "longrope"):
        seq_len = 0  # the others do not depend on it
    inv, scale = _cached_inv_freq(rope, head_dim, max_positions, seq_len)
    freqs = positions.float()[..., None] * inv.to(positions.device)[None, None, :]  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by (B, T, rd) angles; dims past rd pass through unchanged."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rd)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
