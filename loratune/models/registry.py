"""model_type -> family spec. Adding a family: its ``models/<family>.py`` and one line here."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import CheckpointError
from .gemma3 import GEMMA3_SPEC
from .gpt2 import GPT2_SPEC
from .llama import LLAMA_SPEC
from .mistral import MISTRAL_SPEC
from .phi3 import PHI3_SPEC
from .qwen2 import QWEN2_SPEC
from .qwen3 import QWEN3_SPEC
from .smollm3 import SMOLLM3_SPEC
from .spec import FamilySpec

FAMILIES: dict[str, FamilySpec] = {spec.model_type: spec for spec in (
    GPT2_SPEC, LLAMA_SPEC, MISTRAL_SPEC, QWEN2_SPEC, QWEN3_SPEC, PHI3_SPEC, GEMMA3_SPEC, SMOLLM3_SPEC)}
DEFAULT_FAMILY = GPT2_SPEC.model_type
"""The family `loratune init-model` writes unless told otherwise."""
DEFAULT_MODEL = "gpt2"
"""The tutorial's base model (a hub id), the recipe's default."""


def find_family(model_type: Any) -> FamilySpec | None:
    """The spec for a config.json ``model_type``, or None for a family loratune does not implement."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def family_for_config(hf_config: dict[str, Any]) -> FamilySpec:
    """The spec for a config.json dict; an unsupported architecture is a CheckpointError naming it."""
    family = find_family(hf_config.get("model_type"))
    if family is None:
        archs = hf_config.get("architectures")
        archs = ", ".join(map(str, archs)) if isinstance(archs, list) and archs else str(archs or "unknown")
        supported = ", ".join(f"{s.display_name} ('{s.model_type}')" for s in FAMILIES.values())
        raise CheckpointError(f"config.json describes model_type={hf_config.get('model_type')!r} ({archs}), which "
                              f"loratune does not support; supported: {supported}")
    return family


def family_for_gguf(arch: str, name: Any) -> FamilySpec:
    """The spec for a GGUF's ``general.architecture`` (and ``general.name``, where several families share an
    architecture: Mistral is 'llama' with 'mistral' in its name); an unsupported one is refused by name."""
    found = [s for s in FAMILIES.values() if s.gguf is not None and s.gguf.arch == arch]
    name = name.lower() if isinstance(name, str) else ""
    hinted = [s for s in found if s.gguf.name_hint and s.gguf.name_hint in name]
    plain = [s for s in found if not s.gguf.name_hint]
    if hinted or plain:
        return (hinted or plain)[0]
    supported = sorted({s.gguf.arch for s in FAMILIES.values() if s.gguf is not None})
    raise CheckpointError(f"the GGUF's architecture is {arch!r}, which loratune does not read; supported: "
                          f"{', '.join(supported)}")


def family_of(model: nn.Module) -> tuple[FamilySpec, Any] | None:
    """(spec, our config) for one of our models or a transformers model of a known family; else None.

    Ours carry ``family`` and a typed ``config``; transformers' have ``config.model_type`` and a
    config object whose dict our family's parser reads.
    """
    family = getattr(model, "family", None)
    if isinstance(family, FamilySpec):
        return family, model.config
    hf_config = getattr(model, "config", None)
    family = find_family(getattr(hf_config, "model_type", None))
    if family is None or not hasattr(hf_config, "to_dict"):
        return None
    return family, family.config_from_hf(hf_config.to_dict())
