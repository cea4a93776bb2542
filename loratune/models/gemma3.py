"""Gemma 3 text models (``model_type: gemma3_text``, e.g. gemma-3-1b and 270m).

Differences from Llama, each a DecoderConfig field: embeddings scaled by sqrt(hidden_size),
RMSNorm as (1 + w), GeGLU (tanh GELU), q/k norms, norms before *and* after attention and MLP,
scores scaled by ``query_pre_attn_scalar``**-0.5, local (sliding) and global layers with their
own rope bases (``rope_local_base_freq`` and ``rope_theta``; ``rope_scaling`` applies to global
layers only), and tanh soft-capping of logits where the config sets it.

``attn_logit_softcapping`` is read but, as in transformers' Gemma 3 (which never passes it to its
attention functions, eager or SDPA), has no effect; published Gemma 3 configs set it to null.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from ..hub.gguf_file import GGUFFile
from .decoder_config import DecoderConfig, flag, layer_count, read_common, read_rope, rope_to_hf, to_hf_common
from .decoder_family import decoder_spec
from .gguf import GGUFFacts
from .rope import rope_from_hf


def _ropes(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        max_pos = hf.get("max_position_embeddings", 131072)
        return {"full_attention": rope_from_hf(params.get("full_attention") or {}, 1_000_000.0, max_pos,
                                               "rope_parameters.full_attention."),
                "sliding_attention": rope_from_hf(params.get("sliding_attention") or {}, 10_000.0, max_pos,
                                                  "rope_parameters.sliding_attention.")}
    local = read_rope({"rope_theta": hf.get("rope_local_base_freq", 10_000.0),
                       "max_position_embeddings": hf.get("max_position_embeddings")})
    return {"full_attention": read_rope(hf, default_theta=1_000_000.0), "sliding_attention": local}


def read_config(hf: dict[str, Any]) -> DecoderConfig:
    """A Gemma 3 text config.json -> DecoderConfig."""
    if flag(hf, "use_bidirectional_attention"):
        raise CheckpointError("config.json: use_bidirectional_attention (Gemma 3 embedding models) is not "
                              "supported: loratune fine-tunes causal language models")
    kinds = hf.get("layer_types")
    layers = layer_count(hf, 26)
    if kinds is None and layers is not None:
        pattern = hf.get("sliding_window_pattern", 6)
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    bias = flag(hf, "attention_bias")
    return read_common(hf, "gemma3_text", defaults={
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
        "sliding_window": 4096}, tie_default=True,
        rope=_ropes(hf), layer_types=kinds or [], sliding_window=hf.get("sliding_window", 4096),
        qkv_bias=bias, o_bias=bias, qk_norm=True, norm_unit_offset=True, sandwich_norm=True, embed_scale=True,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        final_logit_softcapping=hf.get("final_logit_softcapping"))


def write_config(config: DecoderConfig) -> dict[str, Any]:
    d = to_hf_common(config, "Gemma3ForCausalLM")
    d.pop("hidden_act")
    local = config.rope["sliding_attention"]
    d.update(hidden_activation=config.hidden_act, rope_local_base_freq=local.rope_theta,
             query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
             layer_types=config.layer_types, attention_bias=config.qkv_bias,
             final_logit_softcapping=config.final_logit_softcapping)
    if rope_to_hf(local) is not None:
        raise CheckpointError("Gemma 3's config.json cannot express rope scaling on its local layers")
    return d


def _gguf_config(file: GGUFFile, hf: dict[str, Any]) -> dict[str, Any]:
    """A gemma3 GGUF. llama.cpp does not store what it hard-codes for Gemma 3: every 6th layer global, local
    layers' rope base 10,000, and scores scaled by head_dim**-0.5 (hidden/heads for the 27B, 62 layers);
    transformers' config defaults agree, and so does this."""
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    scalar = hf["hidden_size"] // heads if layers == 62 else hf["head_dim"]
    hf = dict(hf, sliding_window=file.get("gemma3.attention.sliding_window", 4096), sliding_window_pattern=6,
              rope_local_base_freq=10_000.0, query_pre_attn_scalar=scalar, hidden_activation="gelu_pytorch_tanh")
    softcap = file.get("gemma3.final_logit_softcapping")
    if softcap is not None:
        hf["final_logit_softcapping"] = float(softcap)
    return hf


def _gguf_metadata(hf: dict[str, Any]) -> dict[str, Any]:
    kinds = hf.get("layer_types") or []
    pattern = kinds.index("full_attention") + 1 if "full_attention" in kinds else None
    if kinds and (pattern != 6 or any(k != ("full_attention" if (i + 1) % 6 == 0 else "sliding_attention")
                                      for i, k in enumerate(kinds))):
        raise CheckpointError("llama.cpp runs Gemma 3 with every 6th layer global; this model's layer_types "
                              "differ, so no GGUF would run it as it is")
    if float(hf.get("rope_local_base_freq", 10_000.0)) != 10_000.0:
        raise CheckpointError("llama.cpp runs Gemma 3's local layers with rope base 10,000; this model's "
                              "rope_local_base_freq differs")
    meta = {"gemma3.attention.sliding_window": hf.get("sliding_window", 4096)}
    if hf.get("final_logit_softcapping") is not None:
        meta["gemma3.final_logit_softcapping"] = float(hf["final_logit_softcapping"])
    return meta


GGUF = GGUFFacts(arch="gemma3", norm_shift=1.0, config=_gguf_config, metadata=_gguf_metadata)
"""llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (its norm multiplies by the weight as is)."""

GEMMA3_SPEC = decoder_spec("gemma3_text", "Gemma 3", read_config, write_config, gguf=GGUF, presets={
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=32, max_position_embeddings=512, vocab_size=262144,
                 sliding_window=16, query_pre_attn_scalar=32, final_logit_softcapping=30.0,
                 bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=2048, vocab_size=262144,
                  sliding_window=128, query_pre_attn_scalar=64, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "gemma3-1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, vocab_size=262144,
                      sliding_window=512, query_pre_attn_scalar=256, rope_theta=1000000.0,
                      bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0),
})
