"""Llama 2 / 3.x and SmolLM2 (``model_type: llama``): the plain Llama-style decoder.

Rope scalings as published (Llama 3.1/3.2's ``llama3``, linear, dynamic, yarn), grouped-query
attention, SwiGLU, tied (Llama 3.2 1B/3B, SmolLM2) or untied head, optional attention and MLP biases.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CheckpointError
from ..hub.gguf_file import GGUFFile
from .decoder_config import DecoderConfig, flag, read_common, to_hf_common
from .decoder_family import decoder_spec
from .gguf import GGUFFacts


def read_config(hf: dict[str, Any]) -> DecoderConfig:
    """A Llama config.json -> DecoderConfig."""
    bias = flag(hf, "attention_bias")
    return read_common(hf, "llama", defaults={"rms_norm_eps": 1e-6}, qkv_bias=bias, o_bias=bias,
                       mlp_bias=flag(hf, "mlp_bias"))


def write_config(config: DecoderConfig) -> dict[str, Any]:
    d = to_hf_common(config, "LlamaForCausalLM")
    d.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    return d


def llama3_rope_factors(hf: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's rope scaling as the per-frequency divisors llama.cpp's converter stores (``rope_freqs``)."""
    scaling = hf["rope_scaling"]
    dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    freqs = 1.0 / (hf.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


_LLAMA3_CANDIDATES = tuple({"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": n}
                           for n in [8192] + [2**k for k in range(4, 21) if 2**k != 8192])
"""Llama 3.1 / 3.2 / 3.3's published low/high frequency factors (1, 4) with the original context 8192 first,
then other powers of two: GGUF keeps only the divisors, so we find the scaling that gives them."""


def _gguf_config(file: GGUFFile, hf: dict[str, Any]) -> dict[str, Any]:
    """A llama GGUF: Llama 3.1's rope scaling comes back from its ``rope_freqs`` tensor."""
    hf = dict(hf, attention_bias="blk.0.attn_q.bias" in file.tensors, mlp_bias="blk.0.ffn_up.bias" in file.tensors)
    rope_freqs = file.tensors.get("rope_freqs.weight")
    if rope_freqs is not None:
        stored = rope_freqs.dequantize()
        for candidate in _LLAMA3_CANDIDATES:
            scaling = {"rope_type": "llama3", "factor": float(stored.max()), **candidate}
            if torch.allclose(llama3_rope_factors(dict(hf, rope_scaling=scaling)), stored, rtol=1e-5, atol=1e-6):
                return dict(hf, rope_scaling=scaling)
        raise CheckpointError(f"{file.path}: its rope_freqs tensor matches no published Llama 3 rope scaling")
    return hf


def _gguf_extra_tensors(hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    scaling = hf.get("rope_scaling") or {}
    return {"rope_freqs.weight": llama3_rope_factors(hf)} if scaling.get("rope_type") == "llama3" else {}


GGUF = GGUFFacts(arch="llama", permute_qk=True, config=_gguf_config, extra_tensors=_gguf_extra_tensors)
"""llama.cpp's converter permutes q and k rows for its rope; Llama 3.1's scaling travels as ``rope_freqs``."""

LLAMA_SPEC = decoder_spec("llama", "Llama", read_config, write_config, gguf=GGUF, presets={
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
