"""SmolLM3 (``model_type: smollm3``): Llama-style where every ``no_rope_layer_interval``-th layer
(4 in SmolLM3-3B) attends without rotary embeddings (NoPE), listed per layer in ``no_rope_layers``
(1 = rotary, 0 = none); optional sliding windows apply to the NoPE layers, as transformers reads them."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .decoder_config import DecoderConfig, flag, layer_count, read_common, to_hf_common
from .decoder_family import decoder_spec


def _rope_layers(hf: dict[str, Any]) -> list[bool]:
    layers, interval = layer_count(hf, 36), hf.get("no_rope_layer_interval", 4)
    listed = hf.get("no_rope_layers")
    if listed is None:
        if layers is None or not isinstance(interval, int) or interval <= 0:
            return []  # DecoderConfig names the bad field
        return [(i + 1) % interval != 0 for i in range(layers)]
    if not isinstance(listed, list) or any(v not in (0, 1) for v in listed):
        raise CheckpointError(f"config.json: no_rope_layers must list 0 or 1 per layer, got {listed!r}")
    return [bool(v) for v in listed]


def read_config(hf: dict[str, Any]) -> DecoderConfig:
    """A SmolLM3 config.json -> DecoderConfig."""
    rope_layers = _rope_layers(hf)
    window = hf.get("sliding_window") if flag(hf, "use_sliding_window") else None
    kinds = hf.get("layer_types")
    if kinds is None:
        kinds = ["sliding_attention" if window is not None and not r else "full_attention" for r in rope_layers]
    bias = flag(hf, "attention_bias")
    return read_common(hf, "smollm3", defaults={"vocab_size": 128256, "num_key_value_heads": 4,
                                                "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
                       tie_default=True, rope_layers=rope_layers, layer_types=kinds, sliding_window=window,
                       qkv_bias=bias, o_bias=bias, mlp_bias=flag(hf, "mlp_bias"))


def write_config(config: DecoderConfig) -> dict[str, Any]:
    d = to_hf_common(config, "SmolLM3ForCausalLM")
    sliding = "sliding_attention" in config.layer_types
    d.update(no_rope_layers=[int(r) for r in config.rope_layers], attention_bias=config.qkv_bias,
             mlp_bias=config.mlp_bias, use_sliding_window=sliding, sliding_window=config.sliding_window,
             layer_types=config.layer_types)
    return d


SMOLLM3_SPEC = decoder_spec("smollm3", "SmolLM3", read_config, write_config, presets={
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=128256, rope_theta=5000000.0,
                 bos_token_id=128000, eos_token_id=128012),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=2048, vocab_size=128256, rope_theta=5000000.0,
                  bos_token_id=128000, eos_token_id=128012),
})
