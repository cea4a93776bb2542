"""The adapter variants by name: plain LoRA and the methods that change it (DoRA).

A variant is one :class:`~.update.LoRAUpdate` subclass in its own file, overriding the seam's
methods (see :mod:`.update`); this registry is how a config, the PEFT format and the serving banks
find it. PEFT marks a variant with a flag in adapter_config.json (``use_dora``), and so does
:class:`~.lora.LoRAConfig` (the same name), so one flag picks the class both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .dora import DoRAUpdate
from .update import LoRAUpdate

VARIANTS: dict[str, type[LoRAUpdate]] = {LoRAUpdate.variant: LoRAUpdate, DoRAUpdate.variant: DoRAUpdate}
"""name -> update class; plain LoRA is ``lora``."""


def variant_class(name: str) -> type[LoRAUpdate]:
    """The update class of variant ``name``."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown adapter variant {name!r}: one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def flagged(flags: Mapping[str, Any]) -> str:
    """The variant a PEFT adapter_config (or a LoRAConfig's fields) turns on by its flag, else ``lora``."""
    on = [cls.variant for cls in VARIANTS.values() if cls.peft_flag and bool(flags.get(cls.peft_flag))]
    if len(on) > 1:
        raise ConfigError(f"{' and '.join(VARIANTS[n].peft_flag for n in on)} are both set: pick one adapter variant")
    return on[0] if on else LoRAUpdate.variant


def peft_flags(updates: list[LoRAUpdate]) -> dict[str, bool]:
    """adapter_config.json's variant flags for an adapter made of ``updates`` (``{"use_dora": False}`` ...)."""
    return {cls.peft_flag: any(u.variant == cls.variant for u in updates) for cls in VARIANTS.values() if cls.peft_flag}
