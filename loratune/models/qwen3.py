"""Qwen3 (``model_type: qwen3``): Llama-style with RMSNorm over each head of q and k, and a
``head_dim`` set independently of the hidden size (Qwen3-0.6B: 16 heads of 128 over hidden 1024)."""

from __future__ import annotations

from typing import Any

from .decoder_config import DecoderConfig, flag, read_common, to_hf_common
from .decoder_family import decoder_spec
from .gguf import GGUFFacts
from .qwen2 import qwen_layer_types


def read_config(hf: dict[str, Any]) -> DecoderConfig:
    """A Qwen3 config.json -> DecoderConfig."""
    window, kinds = qwen_layer_types(hf)
    bias = flag(hf, "attention_bias")
    return read_common(hf, "qwen3", defaults={"rms_norm_eps": 1e-6, "vocab_size": 151936, "head_dim": 128,
                                              "max_position_embeddings": 32768},
                       qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window, layer_types=kinds)


def write_config(config: DecoderConfig) -> dict[str, Any]:
    d = to_hf_common(config, "Qwen3ForCausalLM")
    sliding = "sliding_attention" in config.layer_types
    d.update(attention_bias=config.qkv_bias, use_sliding_window=sliding, sliding_window=config.sliding_window,
             layer_types=config.layer_types)
    return d


GGUF = GGUFFacts(arch="qwen3")
"""llama.cpp stores Qwen3 with the tensors as transformers has them (no q/k permutation)."""

QWEN3_SPEC = decoder_spec("qwen3", "Qwen3", read_config, write_config, gguf=GGUF, presets={
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=512, vocab_size=151936,
                 tie_word_embeddings=True, rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, vocab_size=151936,
                  tie_word_embeddings=True, rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645),
})
