"""Phi-3 / Phi-3.5 / Phi-4-mini (``model_type: phi3``): Llama-style with fused projections.

``qkv_proj`` holds [q | k | v] and ``gate_up_proj`` holds [gate | up]. LoRA targets ``q``, ``v``
(or ``q_proj``, ``v_proj``) adapt the q and v *slices* of ``qkv_proj``, as for GPT-2's ``c_attn``,
and export as the exactly equivalent PEFT adapter on ``qkv_proj``. Rope: ``longrope`` (``su``
in older configs) with the top-level ``original_max_position_embeddings``, and
``partial_rotary_factor`` (Phi-4-mini rotates 3/4 of each head).
"""

from __future__ import annotations

from typing import Any

from .decoder_config import DecoderConfig, layer_count, read_common, read_rope, to_hf_common
from .decoder_family import decoder_spec


def read_config(hf: dict[str, Any]) -> DecoderConfig:
    """A Phi-3 config.json -> DecoderConfig."""
    hf = dict(hf)
    scaling = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if scaling.get("type") == "su" or scaling.get("rope_type") == "su":
        scaling["rope_type"] = "longrope"
        scaling.pop("type", None)
    if scaling.get("rope_type", scaling.get("type")) in ("llama3", "yarn", "longrope"):
        scaling["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", 4096)
    hf["rope_parameters"] = scaling or None
    rope = read_rope(hf)
    window = hf.get("sliding_window")
    kinds = ["sliding_attention" if window is not None else "full_attention"] * (layer_count(hf, 32) or 0)
    return read_common(hf, "phi3", defaults={"rms_norm_eps": 1e-5, "vocab_size": 32064,
                                             "max_position_embeddings": 4096},
                       rope={"full_attention": rope, "sliding_attention": rope}, sliding_window=window,
                       layer_types=kinds, fused_qkv=True, fused_gate_up=True)


def write_config(config: DecoderConfig) -> dict[str, Any]:
    d = to_hf_common(config, "Phi3ForCausalLM")
    rope = config.rope["full_attention"]
    d["sliding_window"] = config.sliding_window if "sliding_attention" in config.layer_types else None
    if rope.original_max_position_embeddings is not None:
        d["original_max_position_embeddings"] = rope.original_max_position_embeddings
    return d


PHI3_SPEC = decoder_spec("phi3", "Phi-3", read_config, write_config, fused=True, presets={
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=32064, sliding_window=64,
                 bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=2048, vocab_size=32064,
                  bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
})
