"""What every Llama-style family shares in its spec: weight loading, LoRA aliases, fused slices, memory.

A family file (``models/llama.py``, ``models/qwen3.py`` ...) supplies only its config.json
reader and writer, its name and its presets; :func:`decoder_spec` builds the rest of its
:class:`~loratune.models.spec.FamilySpec` from the shared :class:`~loratune.models.decoder.DecoderLM`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from .decoder import DecoderLM
from .decoder_config import DecoderConfig
from .gguf import GGUFFacts
from .spec import Alias, FamilySpec, MemoryProfile
from .weight_map import LinearHook, assign_weights, linear_weights, map_weights

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old checkpoints saved

_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
          "down": "down_proj"}
_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _aliases(fused_qkv: bool, fused_gate_up: bool) -> dict[str, Alias]:
    """q/k/v/o/gate/up/down and the projection names themselves; on fused layouts, slices of the fused one."""
    out = {}
    for short, proj in _NAMES.items():
        module = f"{_MODULES[proj]}.{proj}"
        alias = Alias(module)
        if fused_qkv and short in ("q", "k", "v"):
            alias = Alias("self_attn.qkv_proj", short)
        if fused_gate_up and short in ("gate", "up"):
            alias = Alias("mlp.gate_up_proj", short)
        out[short] = alias
        if alias.slice is not None:
            out[proj] = alias  # Phi-3 has no q_proj module: 'q_proj' means its slice of qkv_proj
    return out


def _fused_slices(config: DecoderConfig) -> dict[str, dict[str, tuple[int, int]]]:
    out = {}
    if config.fused_qkv:
        q, kv = config.q_width, config.kv_width
        out["self_attn.qkv_proj"] = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    if config.fused_gate_up:
        F = config.intermediate_size
        out["mlp.gate_up_proj"] = {"gate": (0, F), "up": (F, 2 * F)}
    return out


def _memory_profile(config: DecoderConfig) -> MemoryProfile:
    C, F, Q, KV = config.hidden_size, config.intermediate_size, config.q_width, config.kv_width
    # What one block holds for the backward pass per token with LoRA on q and v: each RMSNorm's input
    # (Gemma's sandwich: four norms, else two) and the q/k norms' inputs, counted in float32 (the norm's
    # backward makes a float32 copy of its input); the normed input the adapters read; q and the attention
    # output (SDPA), k and v at their kv width (grouped-query attention never copies them; a fused qkv
    # output stays whole while v, a view of it, is kept); the MLP's gate and up, and its activation
    # (recomputed in the backward pass, so alive there).
    norm_in = (4 if config.sandwich_norm else 2) * C
    qk_in = Q + KV if config.qk_norm else 0
    v_kept = Q + 2 * KV if config.fused_qkv else KV
    saved = norm_in + C + qk_in + 2 * Q + KV + v_kept + 3 * F
    # The peak resident memory is higher: the allocator keeps the freed temporaries between them
    # (measured 1.5-1.7x on CPU), and in bf16 the float32 copies count twice. 1.5 x (saved + half the
    # float32 copies), checked against the measured peaks of benchmarks/guard_accuracy.py
    # (results/guard_accuracy.json) within 15%.
    per_block = (6 * saved + 3 * (norm_in + qk_in)) // 4
    return MemoryProfile(n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, hidden=C,
                         vocab=config.vocab_size, saved_per_token_per_block=per_block,
                         saved_per_token_outside=4 * C, backward_per_token=3 * F)


def _describe(config: DecoderConfig) -> str:
    n_kv = config.num_key_value_heads
    kv = (f"{n_kv} kv head{'s' if n_kv > 1 else ''} (grouped-query)" if n_kv != config.num_attention_heads
          else "no grouped-query")
    extra = []
    sliding = config.layer_types.count("sliding_attention")
    if sliding:
        extra.append(f"sliding window {config.sliding_window} on {sliding} of {config.num_hidden_layers} layers")
    rope_types = sorted({r.rope_type for k, r in config.rope.items() if k in config.layer_types})
    extra.append(f"rope {'/'.join(rope_types)}")
    if config.tie_word_embeddings:
        extra.append("tied head")
    return (f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads of {config.head_dim}, {kv}, "
            f"hidden {config.hidden_size}, mlp {config.intermediate_size}, context {config.max_position_embeddings}, "
            f"vocab {config.vocab_size}; " + ", ".join(extra))


def load_decoder(config: DecoderConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                 family: FamilySpec, linear_hook: LinearHook | None = None) -> DecoderLM:
    """Build the model from a transformers state dict (``*ForCausalLM`` or bare ``*Model`` keys; a lazy
    one is read a tensor at a time).

    Every key and shape is checked; a mismatch is a CheckpointError naming it, and nothing is
    returned half-loaded. A tied head takes the embedding (a saved lm_head.weight is then ignored,
    as transformers ignores it). ``linear_hook`` sees each projection's weight as it is read, the
    head's too (:mod:`.weight_map`).
    """
    layers = {int(m.group(1)) for m in map(_LAYER.match, state) if m}
    if len(layers) != config.num_hidden_layers:  # before building: num_hidden_layers=10**9 must not hang
        raise CheckpointError(f"config.json says num_hidden_layers={config.num_hidden_layers}, but the weights hold "
                              f"{len(layers)} layers")
    with torch.device("meta"):
        model = DecoderLM(config, family)
    tied = config.tie_word_embeddings
    expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}

    def rename(key: str) -> str | None:
        if _IGNORED.search(key) or (tied and key == "lm_head.weight"):
            return None  # old rotary buffers; a tied head transformers ignores as well
        return key if key.startswith(("model.", "lm_head.")) else "model." + key

    mapped = map_weights(state, expected, rename, dtype, f"a {family.display_name} of this config",
                         linear_hook=linear_hook, linears=linear_weights(model))
    if tied:
        mapped["lm_head.weight"] = mapped["model.embed_tokens.weight"]
    assign_weights(model, mapped)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def decoder_spec(model_type: str, display_name: str, read: Callable[[dict[str, Any]], DecoderConfig],
                 write: Callable[[DecoderConfig], dict[str, Any]], presets: dict[str, dict[str, Any]],
                 fused: bool = False, tokenizer_as_saved: bool = False, gguf: GGUFFacts | None = None) -> FamilySpec:
    """A Llama-style family's spec from its config reader/writer, name and presets."""
    spec: FamilySpec

    def build(config: DecoderConfig) -> DecoderLM:
        return DecoderLM(config, spec)

    spec = FamilySpec(
        model_type=model_type, display_name=display_name, config_from_hf=read, config_to_hf=write,
        from_hf_state_dict=lambda config, state, dtype, linear_hook=None: load_decoder(config, state, dtype, spec,
                                                                                   linear_hook),
        build=build, aliases=_aliases(fused, fused), fused_slices=_fused_slices, memory_profile=_memory_profile,
        eos_token=None, hf_linear_transposed=False, describe=_describe, presets=presets, offline_tokenizer=None,
        tokenizer_as_saved=tokenizer_as_saved, gguf=gguf)
    return spec
