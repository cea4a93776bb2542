"""Qwen2 / Qwen2.5 (``model_type: qwen2``): Llama-style with biases on q, k and v (not on o).

Sliding-window layers exist only where ``use_sliding_window`` is set (from ``max_window_layers`` on,
or as ``layer_types`` lists them), as transformers reads them.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .decoder_config import DecoderConfig, flag, layer_count, read_common, to_hf_common
from .decoder_family import decoder_spec
from .gguf import GGUFFacts


def qwen_layer_types(hf: dict[str, Any]) -> tuple[int | None, list[str]]:
    """(sliding_window, layer_types) as Qwen2/Qwen3's configs derive them."""
    window = hf.get("sliding_window", 4096) if flag(hf, "use_sliding_window") else None
    kinds = hf.get("layer_types")
    if kinds is not None:
        if not isinstance(kinds, list):
            raise CheckpointError(f"config.json: layer_types must be a list, got {kinds!r}")
        return window, kinds
    layers, first = layer_count(hf, 32), hf.get("max_window_layers", 28)
    if layers is None or not isinstance(first, int):
        return window, []  # DecoderConfig names the bad field
    return window, ["sliding_attention" if window is not None and i >= first else "full_attention"
                    for i in range(layers)]


def read_config(hf: dict[str, Any]) -> DecoderConfig:
    """A Qwen2 config.json -> DecoderConfig."""
    window, kinds = qwen_layer_types(hf)
    return read_common(hf, "qwen2", defaults={"rms_norm_eps": 1e-6, "vocab_size": 151936,
                                              "max_position_embeddings": 32768},
                       qkv_bias=True, sliding_window=window, layer_types=kinds)


def write_config(config: DecoderConfig) -> dict[str, Any]:
    d = to_hf_common(config, "Qwen2ForCausalLM")
    sliding = "sliding_attention" in config.layer_types
    d.update(use_sliding_window=sliding, sliding_window=config.sliding_window, layer_types=config.layer_types)
    return d


GGUF = GGUFFacts(arch="qwen2")
"""llama.cpp stores Qwen2 with the tensors as transformers has them (no q/k permutation)."""

QWEN2_SPEC = decoder_spec("qwen2", "Qwen2", read_config, write_config, gguf=GGUF, presets={
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=151936, tie_word_embeddings=True,
                 rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=2048, vocab_size=151936, tie_word_embeddings=True,
                  rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645),
})
