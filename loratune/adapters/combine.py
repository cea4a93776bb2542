"""Combining several LoRA adapters into one, layer by layer, with PEFT's definitions.

What for: ``loratune merge`` and the multi-adapter API build a new adapter from trained ones
(a weighted sum, a concatenation, or the merge-literature methods TIES and DARE), and the result
must equal what PEFT's ``LoraModel.add_weighted_adapter`` writes for the same adapters, so a user
can move between the two. Everything here is a pure function of one layer's tensors; the caller
walks the model.

The combination types (``how``), for adapters ``i`` with weight ``w_i``, scale ``s_i``, ``A_i``
(r_i, in) and ``B_i`` (out, r_i):

- ``linear``: mixes the factors, not the updates: ``A = sum sign_i sqrt|w_i s_i| A_i``,
  ``B = sum sqrt|w_i s_i| B_i``. Cheap and only a rough approximation of ``sum w_i delta_i``
  (cross terms); needs equal ranks.
- ``cat``: ``A = [w_i s_i A_i]`` stacked on rows, ``B = [B_i]`` on columns: exactly
  ``sum w_i delta_i`` at rank ``sum r_i``.
- ``svd``: ``sum w_i delta_i`` truncated to ``svd_rank`` by SVD (``B = U S``, ``A = Vh``).
- ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``: like ``linear`` (factor by
  factor, equal ranks) but each factor is first sparsified (``magnitude_prune``, ``ties``: keep
  the ``density`` fraction of largest magnitudes; ``dare_*``: keep each entry with probability
  ``density`` and divide by it) and, for ``*ties``, only entries agreeing with the elected
  sign are averaged (TIES-Merging, Yadav et al. 2023; DARE, Yu et al. 2023).
- ``<type>_svd``: the same sparsify/elect/merge on the full updates ``w_i``-weighted
  ``delta_i = s_i B_i A_i``, then truncated by SVD like ``svd``.

The new adapter always has scale 1: PEFT gives it ``r = lora_alpha = new_rank``
(:func:`combined_rank_alpha`). With a single adapter PEFT always uses ``linear``; so do we.

DARE is random. Draws follow PEFT's order exactly (per layer: the A factors of the adapters in
order, then the B factors; or one draw per adapter's update for ``dare_*_svd``), from
``generator`` or, when None, torch's global RNG, so the same seed gives PEFT's result when the
caller visits layers in the model's module order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, MergeError

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
"""Every combination type, named as PEFT's ``add_weighted_adapter(combination_type=...)`` names it."""
_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # merge A's and B's; equal ranks
_SPARSIFYING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # need density (with or without _svd)
_SIGN_METHODS = ("total", "frequency")
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def _is_svd(how: str) -> bool:
    return how.endswith("svd")


def _merge_method(how: str) -> str:
    """The tensor-merge method behind a combination type: 'svd' -> 'linear', 'ties_svd' -> 'ties'."""
    return "linear" if how in ("svd", "cat") else how.removesuffix("_svd")


def needs_same_targets(how: str) -> bool:
    """True for the sparsifying types (TIES, DARE, magnitude pruning), which we refuse on adapters
    that adapt different modules; linear, cat and svd treat a missing module as a zero update."""
    return _merge_method(how) in _SPARSIFYING


@dataclass
class LayerUpdate:
    """One adapter's update of one layer: ``delta = scale * B @ A``, shaped like the weight (out, in)."""

    A: torch.Tensor
    """(r, in)"""
    B: torch.Tensor
    """(out, r)"""
    scale: float
    """alpha / r, or alpha / sqrt(r) with rslora."""

    @property
    def rank(self) -> int:
        """r, the rows of A."""
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense update (out, in), in float32 (PEFT's ``get_delta_weight``)."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass
class CombineConfig:
    """How to combine adapters: the type and its options (PEFT's ``add_weighted_adapter`` arguments)."""

    how: str = "svd"
    """One of :data:`COMBINATIONS`."""
    svd_rank: int | None = None
    """Rank of the result for the *_svd types; None: the largest rank among the adapters."""
    svd_clamp: float | None = None
    """*_svd only: clamp both SVD factors to this quantile of their entries (and its negative); None: no clamp."""
    full_matrices: bool = True
    """*_svd only: full or reduced SVD (``torch.linalg.svd``'s ``full_matrices``); truncated either way."""
    driver: str | None = None
    """*_svd only: cuSOLVER driver (None, 'gesvd', 'gesvdj', 'gesvda'); CUDA only."""
    density: float | None = None
    """Fraction of entries kept, in (0, 1]; required by the ties, dare and magnitude_prune types, else unused."""
    majority_sign_method: str = "total"
    """The *ties types' sign election: 'total' (sign of the sum) or 'frequency' (sign of the count)."""

    def __post_init__(self) -> None:
        if self.how not in COMBINATIONS:
            raise ConfigError(f"unknown combination type {self.how!r}: use one of {', '.join(COMBINATIONS)}")
        svd = _is_svd(self.how)
        if self.svd_rank is not None:
            if isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, int) or self.svd_rank <= 0:
                raise ConfigError(f"svd_rank must be a positive integer, got {self.svd_rank!r}")
            if not svd:
                raise ConfigError(f"svd_rank applies to the *svd types only, not {self.how!r}: drop it")
        if self.svd_clamp is not None:
            if not isinstance(self.svd_clamp, (int, float)) or not 0.0 < self.svd_clamp <= 1.0:
                raise ConfigError(f"svd_clamp is a quantile in (0, 1], got {self.svd_clamp!r}")
            if not svd:
                raise ConfigError(f"svd_clamp applies to the *svd types only, not {self.how!r}: drop it")
        if self.driver not in _SVD_DRIVERS:
            raise ConfigError(f"driver must be one of {_SVD_DRIVERS}, got {self.driver!r}")
        sparsifying = _merge_method(self.how) in _SPARSIFYING
        if sparsifying and self.density is None:
            raise ConfigError(f"{self.how!r} needs density, the fraction of entries kept, in (0, 1]")
        if self.density is not None:
            if not sparsifying:
                raise ConfigError(f"density applies to the ties, dare and magnitude_prune types, not {self.how!r}")
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) \
                    or not 0.0 < self.density <= 1.0:
                raise ConfigError(f"density must be in (0, 1] (the fraction of entries kept), got {self.density!r}")
        if self.majority_sign_method not in _SIGN_METHODS:
            raise ConfigError(f"majority_sign_method must be one of {_SIGN_METHODS}, "
                              f"got {self.majority_sign_method!r}")


def effective_how(how: str, n_adapters: int) -> str:
    """The type actually used: PEFT combines a single adapter with ``linear`` whatever was asked."""
    return "linear" if n_adapters == 1 else how


def combined_rank_alpha(how: str, ranks: list[int], svd_rank: int | None = None,
                        rslora: bool = False) -> tuple[int, float]:
    """The new adapter's ``(r, alpha)`` as PEFT sets it, so that its scale is 1.

    ``r``: the common rank for the factorwise types (which need equal ranks), the sum for
    ``cat``, ``svd_rank`` or else the largest rank for the *_svd types. PEFT sets
    ``lora_alpha = r``; with rslora that scale would be ``sqrt(r)`` (PEFT keeps the first
    adapter's ``use_rslora``, which scales its combined adapter by ``sqrt(r)``: we do not copy
    that) so we return ``alpha = sqrt(r)`` there, giving scale 1 either way.
    """
    if not ranks:
        raise ConfigError("no adapters to combine: name at least one")
    how = effective_how(how, len(ranks))
    if how in _FACTORWISE:
        _check_equal_ranks(how, ranks)
        r = ranks[0]
    elif how == "cat":
        r = sum(ranks)
    else:
        r = svd_rank or max(ranks)
    return r, (math.sqrt(r) if rslora else float(r))


def _check_equal_ranks(how: str, ranks: list[int]) -> None:
    if len(set(ranks)) != 1:
        raise MergeError(f"{how!r} mixes the A and B factors, so all adapters need the same rank; got ranks "
                         f"{ranks}: use 'cat' or 'svd' (or an *_svd type) for adapters of different ranks")


def check_same_targets(modules_by_adapter: dict[str, set[str]], how: str) -> set[str]:
    """The modules the combined adapter adapts (the union); raises for the sparsifying types when
    the adapters do not all adapt the same modules.

    PEFT never checks: for a module some adapters lack it combines the others alone. For linear,
    cat and svd that is the same as a zero update there, so we allow it. For TIES and DARE it is
    not what the methods define (the sign election and the density apply across all adapters,
    and the random draws shift), so we refuse, naming the modules that differ.
    """
    if not modules_by_adapter:
        raise ConfigError("no adapters to combine: name at least one")
    union = set().union(*modules_by_adapter.values())
    if not needs_same_targets(effective_how(how, len(modules_by_adapter))):
        return union
    missing = {name: sorted(union - mods) for name, mods in modules_by_adapter.items() if union - mods}
    if missing:
        detail = "; ".join(f"{name} lacks {', '.join(mods[:5])}" + (f" (+{len(mods) - 5} more)" if len(mods) > 5
                                                                      else "") for name, mods in missing.items())
        raise MergeError(f"{how!r} needs adapters that adapt the same modules: {detail}. Use linear, cat or svd, "
                         "or adapters trained on the same targets")
    return union


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` entries of largest magnitude (TIES' trim step)."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top.indices] = 1
    return tensor * mask.reshape(tensor.shape)


def drop_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the kept ones by it (DARE), so the
    expected value is unchanged. density 1 draws nothing."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Which entries of ``stacked`` (n, ...) agree with the elected sign per position: the sign of
    the sum ('total') or of the sign count ('frequency'); ties go to +."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None = None,
                  majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge same-shaped task tensors with per-tensor ``weights`` (n,) by ``method``: 'linear'
    (weighted sum), 'magnitude_prune' / 'dare_linear' (sparsify, then weighted sum), 'ties' /
    'dare_ties' (sparsify, elect signs on the unweighted tensors, average the agreeing weighted ones)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [drop_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, *shape)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def combine_layer(updates: list[LayerUpdate | None], weights: list[float], how: str, *, svd_rank: int | None = None,
                  svd_clamp: float | None = None, full_matrices: bool = True, driver: str | None = None,
                  density: float | None = None, majority_sign_method: str = "total",
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined adapter's ``(A, B)`` for one layer, for scale 1 (``r = alpha``, see
    :func:`combined_rank_alpha`), in the dtype of the first update's A.

    ``updates[i]`` is adapter ``i``'s update of this layer, or None where adapter ``i`` does not
    adapt it (allowed for linear, cat and svd only: see :func:`check_same_targets`); ``weights``
    aligns with ``updates``. For ``cat`` with None entries the rank is the sum of the present
    ones: :func:`pad_rank` to the adapter's rank as PEFT does. For the *_svd types pass
    ``svd_rank`` from :func:`combined_rank_alpha` when some adapters are absent here.
    """
    cfg = CombineConfig(how=how, svd_rank=svd_rank, svd_clamp=svd_clamp, full_matrices=full_matrices,
                        driver=driver, density=density, majority_sign_method=majority_sign_method)
    present = _check_updates(updates, weights, cfg)
    how = effective_how(cfg.how, len(updates))
    if how == "cat":
        A = torch.cat([u.A * w * u.scale for u, w in present], dim=0)  # (sum r_i, in)
        B = torch.cat([u.B for u, _ in present], dim=1)  # (out, sum r_i)
        return A, B
    if _is_svd(how):
        return _combine_svd(present, cfg, generator)
    return _combine_factorwise(present, how, cfg, generator)


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``A`` (r, in) and ``B`` (out, r) to ``rank``; the update ``B @ A`` is unchanged."""
    if rank < A.shape[0]:
        raise MergeError(f"cannot pad rank {A.shape[0]} down to {rank}")
    extra = rank - A.shape[0]
    return torch.cat([A, A.new_zeros(extra, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)


def _check_updates(updates: list[LayerUpdate | None], weights: list[float],
                   cfg: CombineConfig) -> list[tuple[LayerUpdate, float]]:
    if not updates:
        raise ConfigError("no adapters to combine: name at least one")
    if len(weights) != len(updates):
        raise ConfigError(f"{len(updates)} adapters but {len(weights)} weights: give one weight per adapter")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    present = [(u, float(w)) for u, w in zip(updates, weights) if u is not None]
    if not present:
        raise MergeError("none of the adapters adapts this layer: leave it out of the combination")
    how = effective_how(cfg.how, len(updates))
    if len(present) < len(updates) and needs_same_targets(how):
        raise MergeError(f"{how!r} needs every adapter to adapt every combined layer; "
                         f"{len(updates) - len(present)} of {len(updates)} do not adapt this one")
    shapes = {(u.B.shape[0], u.A.shape[1]) for u, _ in present}
    if len(shapes) > 1:
        raise MergeError(f"the adapters' updates of this layer differ in shape (out, in): {sorted(shapes)}")
    if any(u.A.shape[0] != u.B.shape[1] for u, _ in present):
        raise MergeError("an update's A (r, in) and B (out, r) disagree on r")
    if how in _FACTORWISE:
        _check_equal_ranks(how, [u.rank for u, _ in present])
    return present


def _combine_factorwise(present: list[tuple[LayerUpdate, float]], how: str, cfg: CombineConfig,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    # sqrt(|w s|) on both factors and the sign on A only, so that B @ A carries w * s
    roots = [math.sqrt(abs(w * u.scale)) for u, w in present]
    signs = [1 if w * u.scale >= 0 else -1 for u, w in present]
    weights_A = torch.tensor([root * sign for root, sign in zip(roots, signs)], device=present[0][0].A.device)
    weights_B = torch.tensor(roots, device=present[0][0].B.device)
    dtype = present[0][0].A.dtype
    merged = [merge_tensors([u.A for u, _ in present], weights_A, how, cfg.density, cfg.majority_sign_method,
                            generator),  # draws for every A first, then every B: PEFT's order
              merge_tensors([u.B for u, _ in present], weights_B, how, cfg.density, cfg.majority_sign_method,
                            generator)]
    return merged[0].to(dtype), merged[1].to(dtype)


def _combine_svd(present: list[tuple[LayerUpdate, float]], cfg: CombineConfig,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [u.delta() for u, _ in present]  # each (out, in), float32
    weights = torch.tensor([w for _, w in present], device=deltas[0].device)
    delta = merge_tensors(deltas, weights, _merge_method(cfg.how), cfg.density, cfg.majority_sign_method, generator)
    rank = cfg.svd_rank or max(u.rank for u, _ in present)
    if rank > min(delta.shape):
        raise MergeError(f"svd_rank {rank} exceeds this layer's full rank {min(delta.shape)} (out, in = "
                         f"{tuple(delta.shape)}): choose a smaller svd_rank")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=cfg.full_matrices, driver=cfg.driver)
    B = U[:, :rank] @ torch.diag(S[:rank])  # (out, rank)
    A = Vh[:rank, :]  # (rank, in)
    if cfg.svd_clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), cfg.svd_clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    dtype = present[0][0].A.dtype
    return A.to(dtype), B.to(dtype)
