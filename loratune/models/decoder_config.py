"""The configuration of the Llama-style decoder that Llama, Mistral, Qwen2/3, Phi-3 and Gemma 3 share.

Each difference between those families is one named field here, with its default the plain
Llama behaviour. Each family's file (``models/<family>.py``) reads its config.json into this
dataclass with :func:`read_common` plus its own few fields, so a config the decoder cannot
honour (an unknown activation, rope type or attention layer type) fails by name at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from .rope import Rope, positive, rope_from_hf

_MAX_SIZE = 2**24  # per config dimension; products of two stay far from int64 overflow
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class DecoderConfig:
    """Hyper-parameters of a Llama-style decoder (names follow transformers' config.json)."""

    vocab_size: int = 32000
    """Number of token ids."""
    hidden_size: int = 4096
    """Residual width C."""
    intermediate_size: int = 11008
    """MLP width F."""
    num_hidden_layers: int = 32
    """Decoder layers."""
    num_attention_heads: int = 32
    """Query heads."""
    num_key_value_heads: int = 32
    """Key/value heads (fewer than query heads: grouped-query attention)."""
    head_dim: int = 128
    """Width of one head (Qwen3 and Gemma 3 set it independently of hidden_size)."""
    max_position_embeddings: int = 4096
    """Context length."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """The output head shares the token embedding's weight."""
    hidden_act: str = "silu"
    """Gated MLP activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU, Gemma)."""
    rope: dict[str, Rope] = field(default_factory=lambda: {"full_attention": Rope()})
    """Rotary settings per attention layer type (Gemma 3's local layers have their own base)."""
    layer_types: list[str] = field(default_factory=list)
    """Per layer: full_attention or sliding_attention ([] = all full)."""
    rope_layers: list[bool] = field(default_factory=list)
    """Per layer: whether it rotates q and k ([] = all do; SmolLM3 leaves every 4th without: NoPE)."""
    sliding_window: int | None = None
    """Keys a sliding_attention layer sees: the query's own position and the window - 1 before it."""
    qkv_bias: bool = False
    """q, k and v projections have biases (Qwen2; Llama's attention_bias)."""
    o_bias: bool = False
    """The output projection has a bias (Llama's attention_bias)."""
    mlp_bias: bool = False
    """gate, up and down projections have biases (Llama's mlp_bias)."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before rotary (Qwen3, Gemma 3)."""
    norm_unit_offset: bool = False
    """RMSNorm scales by (1 + weight), weights stored around 0 (Gemma)."""
    sandwich_norm: bool = False
    """Norms after attention and after the MLP too, before the residual add (Gemma 3)."""
    embed_scale: bool = False
    """Token embeddings are multiplied by sqrt(hidden_size) (Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores scale by this**-0.5 instead of head_dim**-0.5 (Gemma 3)."""
    final_logit_softcapping: float | None = None
    """Output logits pass through cap * tanh(z / cap)."""
    fused_qkv: bool = False
    """q, k, v live in one qkv_proj, [q | k | v] (Phi-3)."""
    fused_gate_up: bool = False
    """gate and up live in one gate_up_proj, [gate | up] (Phi-3)."""
    bos_token_id: int | None = None
    """Beginning-of-text id (informational; the tokenizer decides what it prepends)."""
    eos_token_id: int | list[int] | None = None
    """End-of-text id(s) from config.json."""
    pad_token_id: int | None = None
    """Padding id from config.json."""
    model_type: str = "llama"
    """The family's config.json model_type (its spec writes config.json back)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
                raise CheckpointError(f"config.json: {name} must be a positive integer (at most {_MAX_SIZE:,}), "
                                      f"got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"config.json: head_dim={self.head_dim} must be even for rotary embeddings")
        positive(self.rms_norm_eps, "rms_norm_eps")
        for name in ("query_pre_attn_scalar", "final_logit_softcapping"):
            if getattr(self, name) is not None:
                positive(getattr(self, name), name)
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"config.json: hidden_act {self.hidden_act!r} is not supported (supported: "
                                  f"{', '.join(ACTIVATIONS)})")
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise CheckpointError(f"config.json: layer_types lists {len(self.layer_types)} layers, but "
                                  f"num_hidden_layers is {self.num_hidden_layers}")
        if self.rope_layers and len(self.rope_layers) != self.num_hidden_layers:
            raise CheckpointError(f"config.json: no_rope_layers lists {len(self.rope_layers)} layers, but "
                                  f"num_hidden_layers is {self.num_hidden_layers}")
        for kind in set(self.layer_types):
            if kind not in LAYER_TYPES:
                raise CheckpointError(f"config.json: layer type {kind!r} is not supported (supported: "
                                      f"{', '.join(LAYER_TYPES)})")
            if kind not in self.rope:
                raise CheckpointError(f"config.json: no rope parameters for {kind} layers")
        if "sliding_attention" in self.layer_types:
            w = self.sliding_window
            if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
                raise CheckpointError(f"config.json: sliding_window must be a positive integer for sliding_attention "
                                      f"layers, got {w!r}")
        for rope in self.rope.values():
            if int(self.head_dim * rope.partial_rotary_factor) % 2:
                raise CheckpointError("config.json: partial_rotary_factor gives an odd rotary dimension")

    @property
    def context_length(self) -> int:
        """Longest sequence the model takes: max_position_embeddings, stretched by ``factor`` under
        dynamic rope scaling (which exists to run past the trained context)."""
        rope = self.rope.get("full_attention")
        if rope is not None and rope.rope_type == "dynamic":
            return int(self.max_position_embeddings * rope.factor)
        return self.max_position_embeddings

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or None where it attends to every earlier position."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


def flag(hf: dict[str, Any], name: str, default: bool = False) -> bool:
    """A boolean config.json field (null = default); anything but true/false is a CheckpointError."""
    value = hf.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: {name} must be true or false, got {value!r}")
    return value


def layer_count(hf: dict[str, Any], default: int) -> int | None:
    """num_hidden_layers when it is usable to derive per-layer lists from, else None (DecoderConfig
    then names the bad field)."""
    layers = hf.get("num_hidden_layers", default)
    return layers if isinstance(layers, int) and not isinstance(layers, bool) and 0 < layers <= 2**16 else None


def read_rope(hf: dict[str, Any], default_theta: float = 10000.0) -> Rope:
    """The one rope of a config: transformers 5's rope_parameters, or rope_theta + rope_scaling."""
    params = hf.get("rope_parameters")
    key = "rope_parameters."
    if params is None:
        params, key = hf.get("rope_scaling"), "rope_scaling."
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"config.json: {key[:-1]} must be an object, got {params!r}")
    params = dict(params or {})
    if hf.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    theta = hf.get("rope_theta")
    return rope_from_hf(params, default_theta if theta is None else theta,
                        hf.get("max_position_embeddings") or 4096, key)


def read_common(hf: dict[str, Any], model_type: str, defaults: dict[str, Any] | None = None,
                **fields: Any) -> DecoderConfig:
    """The fields every Llama-style config.json shares, plus the family's own ``fields``.

    ``defaults`` are the family's config-class defaults for keys config.json leaves out.
    ``model_type`` must match (a Qwen config handed to the Llama reader is an error, not a guess).
    """
    if hf.get("model_type") != model_type:
        raise CheckpointError(f"config.json describes model_type={hf.get('model_type')!r}, not {model_type!r}")
    hf = {**(defaults or {}), **hf}
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")  # Gemma names it hidden_activation
    heads = hf.get("num_attention_heads", 32)
    hidden = hf.get("hidden_size", 4096)
    head_dim = hf.get("head_dim")
    if head_dim is None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        head_dim = hidden // heads
    kwargs: dict[str, Any] = dict(
        model_type=model_type, vocab_size=hf.get("vocab_size", 32000), hidden_size=hidden,
        intermediate_size=hf.get("intermediate_size", 11008),
        num_hidden_layers=hf.get("num_hidden_layers", 32), num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=flag(hf, "tie_word_embeddings", fields.pop("tie_default", False)),
        hidden_act=act, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    if "rope" not in fields:
        kwargs["rope"] = {"full_attention": read_rope(hf), "sliding_attention": read_rope(hf)}
    kwargs.update(fields)
    return DecoderConfig(**kwargs)


def rope_to_hf(rope: Rope) -> dict[str, Any] | None:
    """A Rope as config.json's rope_scaling dict (None for plain rope), without rope_theta."""
    if rope.rope_type == "default":
        return None
    d = {"rope_type": rope.rope_type}
    for name in Rope.__dataclass_fields__:
        value = getattr(rope, name)
        if name not in ("rope_type", "rope_theta", "partial_rotary_factor", "truncate") and value is not None:
            d[name] = list(value) if isinstance(value, tuple) else value
    return d


def to_hf_common(config: DecoderConfig, architecture: str) -> dict[str, Any]:
    """The config.json fields every family writes the same way (the family adds its own).

    Rope settings are written the way hub checkpoints carry them (rope_theta + rope_scaling),
    which transformers 4 and 5, vLLM and llama.cpp's converters all read.
    """
    d = {name: getattr(config, name) for name in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")}
    rope = config.rope["full_attention"]
    d.update(architectures=[architecture], rope_theta=rope.rope_theta, rope_scaling=rope_to_hf(rope))
    if rope.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = rope.partial_rotary_factor
    return d
