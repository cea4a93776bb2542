"""The seeds torch takes, checked once for every place a user gives one (the recipe, generate, serve).

A seed is a run-time value shared by training and generation alike, so its rule lives below both:
the recipe checks ``seed`` with it without importing the generation package.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

SEED_LIMIT = 2 ** 64
"""Seeds are 0 <= seed < 2**64: what torch.Generator.manual_seed takes (an unsigned 64-bit integer)."""


def check_seed(seed: Any, name: str = "seed") -> None:
    """Refuse a seed torch cannot take, here rather than as a traceback from manual_seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in [0, 2**64), got {seed!r}")
