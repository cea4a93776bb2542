"""Llama 2 / 3.x and SmolLM2 (``model_type: llama``): the plain Llama-style decoder.

Rope scalings as published (Llama 3.1/3.2's ``llama3``, linear, dynamic, yarn), grouped-query
attention, SwiGLU, tied (Llama 3.2 1B/3B, SmolLM2) or untied head, optional attention and MLP biases.
"""

from __future__ import annotations

from typing import Any

from .decoder_config import DecoderConfig, flag, read_common, to_hf_common
from .decoder_family import decoder_spec


def read_config(hf: dict[str, Any]) -> DecoderConfig:
    """A Llama config.json -> DecoderConfig."""
    bias = flag(hf, "attention_bias")
    return read_common(hf, "llama", defaults={"rms_norm_eps": 1e-6}, qkv_bias=bias, o_bias=bias,
                       mlp_bias=flag(hf, "mlp_bias"))


def write_config(config: DecoderConfig) -> dict[str, Any]:
    d = to_hf_common(config, "LlamaForCausalLM")
    d.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    return d


LLAMA_SPEC = decoder_spec("llama", "Llama", read_config, write_config, presets={
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=128256, tie_word_embeddings=True,
                 rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
                 rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=2048, vocab_size=128256, tie_word_embeddings=True,
                  rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, vocab_size=128256,
                        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        bos_token_id=128000, eos_token_id=128001),
})
