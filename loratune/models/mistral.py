"""Mistral (``model_type: mistral``): Llama-style with a sliding attention window on every layer.

Each query sees itself and the ``sliding_window - 1`` positions before it, in training and in the
KV cache (a ring buffer of ``sliding_window`` slots per layer); ``sliding_window: null`` (Mistral
v0.2+ checkpoints) means full attention.
"""

from __future__ import annotations

from typing import Any

from .decoder_config import DecoderConfig, layer_count, read_common, to_hf_common
from .decoder_family import decoder_spec
from .gguf import GGUFFacts


def read_config(hf: dict[str, Any]) -> DecoderConfig:
    """A Mistral config.json -> DecoderConfig."""
    window = hf.get("sliding_window", 4096)
    kinds = ["sliding_attention" if window is not None else "full_attention"] * (layer_count(hf, 32) or 0)
    return read_common(hf, "mistral", defaults={"rms_norm_eps": 1e-6, "num_key_value_heads": 8,
                                                "max_position_embeddings": 4096 * 32},
                       sliding_window=window, layer_types=kinds)


def write_config(config: DecoderConfig) -> dict[str, Any]:
    d = to_hf_common(config, "MistralForCausalLM")
    d["sliding_window"] = config.sliding_window if "sliding_attention" in config.layer_types else None
    return d


GGUF = GGUFFacts(arch="llama", permute_qk=True, name_hint="mistral",
                 config=lambda file, hf: dict(hf, sliding_window=None))
"""llama.cpp stores Mistral as 'llama' (``general.name`` tells them apart, as transformers reads it) and
keeps no sliding window: the model runs with full attention there, and so does ours from a GGUF."""

MISTRAL_SPEC = decoder_spec("mistral", "Mistral", read_config, write_config, tokenizer_as_saved=True, gguf=GGUF, presets={
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=32000, sliding_window=32,
                 bos_token_id=1, eos_token_id=2),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=2048, vocab_size=32000, sliding_window=256,
                  bos_token_id=1, eos_token_id=2),
})
