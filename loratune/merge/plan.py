"""What ``loratune merge`` folds into a base: one adapter, or several combined with weights first.

One adapter merges as it is (plain LoRA, or a variant with its own tensors). Several are loaded under their
own names and combined into one adapter with PEFT's ``add_weighted_adapter`` rules
(:func:`~loratune.adapters.named.combine_adapters`), which then merges; ``cat`` is the exact weighted sum of the
updates, the other types approximate it at a rank or sparsify it (TIES, DARE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters.lora import merge_lora
from ..adapters.named import combine_adapters
from ..adapters.peft_format import load_adapter


def adapter_names_for(dirs: list[Path]) -> list[str]:
    """Names to load adapters under, from their directories (so errors name them): 'tldr', 'titles',
    'adapter' then 'adapter_2' for two directories of the same name; dots would nest modules."""
    names: list[str] = []
    for d in dirs:
        base = re.sub(r"[^\w-]", "_", Path(d).name) or "adapter"
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


@dataclass
class MergePlan:
    """The adapters to merge, their weights and how several combine."""

    adapter_dirs: list[Path]
    """Local adapter directories, in order."""
    weights: list[float]
    """One weight per adapter (a single adapter's weight scales its update)."""
    how: str = "cat"
    """Combination type for several adapters (see :data:`~loratune.adapters.combine.COMBINATIONS`)."""
    options: dict[str, Any] = field(default_factory=dict)
    """density, svd_rank, majority_sign_method (None values are dropped)."""
    seed: int = 0
    """Seed of DARE's random drops."""
    base_model: str | None = None
    """The base's name as given, for the adapters' base-model check."""

    def load(self, model: nn.Module) -> None:
        """Attach the adapters (combined into one active adapter when there are several)."""
        if len(self.adapter_dirs) == 1 and self.weights == [1.0]:
            load_adapter(model, self.adapter_dirs[0], base_model=self.base_model)
            return
        names = adapter_names_for(self.adapter_dirs)
        for name, path in zip(names, self.adapter_dirs):
            load_adapter(model, path, base_model=self.base_model, name=name)
        options = {k: v for k, v in self.options.items() if v is not None}
        how = self.how if len(names) > 1 else "linear"
        combine_adapters(model, names, self.weights, "merged", how=how, seed=self.seed, **options)

    def apply(self, model: nn.Module) -> int:
        """Load and merge; returns how many layers were merged."""
        self.load(model)
        return merge_lora(model)
