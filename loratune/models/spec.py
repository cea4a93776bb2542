"""What the rest of loratune may know about a model family: one :class:`FamilySpec` per family.

Everything family-specific lives beside the family's model (``models/<family>.py``): how its
``config.json`` is read, its Hugging Face weight layout, the LoRA aliases and the fused
projections with their real slice widths, the memory profile the resource guards use, and its
special tokens. Code outside ``models/`` asks the spec (through :mod:`loratune.models.registry`)
and never tests a ``model_type`` string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .gguf import GGUFFacts

Span = tuple[int, int]
"""A slice of a projection's output features, [start, stop)."""


@dataclass(frozen=True)
class Alias:
    """A friendly LoRA target name: a module-name suffix, and for a fused projection which slice."""

    module: str
    """Module-name suffix, e.g. 'attn.c_attn' (matched like PEFT's list targets)."""
    slice: str | None = None
    """Name of one slice of a fused projection (see FamilySpec.fused_slices); None = the whole module."""


@dataclass(frozen=True)
class MemoryProfile:
    """The shapes the resource guards need to estimate a training step's memory."""

    n_layer: int
    """Transformer blocks."""
    n_head: int
    """Query heads (the batched-matmul attention keeps heads x T x T probabilities)."""
    hidden: int
    """Residual width C."""
    vocab: int
    """Output-head rows V."""
    saved_per_token_per_block: int
    """Activation elements autograd keeps per token in one block (GPT-2: 9C + 2F)."""
    saved_per_token_outside: int
    """Activation elements kept per token outside the blocks (last block out, final norm, loss grad)."""
    backward_per_token: int
    """Gradient elements in flight per token during the backward pass (about two MLP-wide tensors)."""


@dataclass(frozen=True)
class FamilySpec:
    """One model family's facts, for everything outside ``models/``."""

    model_type: str
    """transformers' ``model_type`` in config.json."""
    display_name: str
    """How people write the family's name ('GPT-2')."""
    config_from_hf: Callable[[dict[str, Any]], Any]
    """config.json dict -> our typed config (raises CheckpointError naming a bad field)."""
    config_to_hf: Callable[[Any], dict[str, Any]]
    """our typed config -> a config.json dict transformers reads (the family's writer: what export writes)."""
    from_hf_state_dict: Callable[[Any, dict, Any], Any]
    """(config, HF state dict (or a lazy one), dtype or None, optional ``linear_hook=``) -> our model, every key
    and shape checked (the hook: :mod:`.weight_map`)."""
    build: Callable[[Any], Any]
    """config -> a model with uninitialised weights (init_weights() gives it the family's init)."""
    aliases: dict[str, Alias]
    """LoRA target aliases: 'q' -> the q slice of the fused qkv projection, 'mlp.fc' -> ..."""
    fused_slices: Callable[[Any], dict[str, dict[str, Span]]]
    """config -> {fused module suffix: {slice name: (start, stop)}} with the real widths."""
    memory_profile: Callable[[Any], MemoryProfile]
    """config -> the shapes the memory estimate needs."""
    eos_token: str | None
    """Text of the end-of-text token, for tokenizers built from vocab + merges files."""
    hf_linear_transposed: bool = False
    """transformers stores this family's projections transposed (Conv1D): PEFT's fan_in_fan_out."""
    describe: Callable[[Any], str] = repr
    """config -> one line for `loratune info` ('12 layers, 12 heads, hidden 768, ...')."""
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named sizes for `loratune init-model` (config keyword arguments)."""
    offline_tokenizer: Callable[[Path], None] | None = None
    """Writes the family's real tokenizer files into a directory without the hub, where a package ships them."""
    gguf: "GGUFFacts | None" = None
    """How llama.cpp stores the family in GGUF (None: loratune neither reads nor writes it as GGUF)."""
    tokenizer_as_saved: bool = False
    """transformers reads this family's tokenizer.json as saved, ignoring tokenizer_config.json's
    tokenizer_class (Mistral: a 'LlamaTokenizer' file is not rebuilt, so ' x' keeps its '▁' token)."""

    def slice_spans(self, config: Any, module_name: str) -> dict[str, Span]:
        """The fused slices of module ``module_name`` (a full name ending in a fused suffix), or {}."""
        for suffix, spans in self.fused_slices(config).items():
            if module_name == suffix or module_name.endswith("." + suffix):
                return spans
        return {}
