"""Phi-3 / Phi-3.5 / Phi-4-mini (``model_type: phi3``): Llama-style with fused projections.

``qkv_proj`` holds [q | k | v] and ``gate_up_proj`` holds [gate | up]. LoRA targets ``q``, ``v``
(or ``q_proj``, ``v_proj``) adapt the q and v *slices* of ``qkv_proj``, as for GPT-2's ``c_attn``,
and export as the exactly equivalent PEFT adapter on ``qkv_proj``. Rope: ``longrope`` (``su``
in older configs) with the top-level ``original_max_position_embeddings``, and
``partial_rotary_factor`` (Phi-4-mini rotates 3/4 of each head).
"""

from __future__ import annotations

from typing import Any

import torch

from ..hub.gguf_file import GGUFFile
from .decoder_config import DecoderConfig, layer_count, read_common, read_rope, to_hf_common
from .decoder_family import decoder_spec
from .gguf import GGUFFacts


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


def _gguf_config(file: GGUFFile, hf: dict[str, Any]) -> dict[str, Any]:
    """A phi3 GGUF: the sliding window, the rotated share of each head, and longrope's factors (stored as
    the tensors ``rope_factors_long`` / ``rope_factors_short``)."""
    hf = dict(hf, sliding_window=file.get("phi3.attention.sliding_window"))
    rotated = file.get("phi3.rope.dimension_count")
    if isinstance(rotated, int) and rotated != hf["head_dim"]:
        hf["partial_rotary_factor"] = rotated / hf["head_dim"]
    long, short = file.tensors.get("rope_factors_long.weight"), file.tensors.get("rope_factors_short.weight")
    if long is not None and short is not None:
        hf["rope_scaling"] = {"rope_type": "longrope", "long_factor": long.dequantize().tolist(),
                              "short_factor": short.dequantize().tolist()}
        hf["original_max_position_embeddings"] = file.get("phi3.rope.scaling.original_context_length", 4096)
    return hf


def _gguf_metadata(hf: dict[str, Any]) -> dict[str, Any]:
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    meta = {"phi3.rope.dimension_count": int(head_dim * hf.get("partial_rotary_factor", 1.0))}
    if hf.get("sliding_window") is not None:
        meta["phi3.attention.sliding_window"] = hf["sliding_window"]
    if (hf.get("rope_scaling") or {}).get("rope_type") == "longrope":
        meta["phi3.rope.scaling.original_context_length"] = hf.get("original_max_position_embeddings", 4096)
    return meta


def _gguf_extra_tensors(hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    scaling = hf.get("rope_scaling") or {}
    if scaling.get("rope_type") != "longrope":
        return {}
    return {"rope_factors_long.weight": torch.tensor(scaling["long_factor"], dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(scaling["short_factor"], dtype=torch.float32)}


GGUF = GGUFFacts(arch="phi3", config=_gguf_config, metadata=_gguf_metadata, extra_tensors=_gguf_extra_tensors)
"""llama.cpp stores Phi-3 with its fused qkv and gate_up projections as they are (no permutation)."""

PHI3_SPEC = decoder_spec("phi3", "Phi-3", read_config, write_config, fused=True, gguf=GGUF, presets={
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=32064, sliding_window=64,
                 bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=2048, vocab_size=32064,
                  bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
})
