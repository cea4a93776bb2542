"""One decoding step of a Llama-style model over a static KV cache: fixed shapes, optionally compiled.

The model's own ``hidden_states`` handles every case (chunks, left padding, ring buffers, rotary
scalings that change with the length), and pays for it at every token: rotary angles computed
again, a mask decided per layer kind, the cache sliced to the length so far (a new shape at every
position). Decoding one token at a time needs none of that. :class:`DecodeStep` runs the
one-token forward over the preallocated cache (every layer keeps all ``max_len`` positions: a cache
made with ``rings=False``), with rotary angles looked up in a table made once and one boolean mask
over the cache's slots (positions not yet written, and those outside a sliding window, are masked).
It attends to the first 64 slots, then to the next power of two above the position (at most twice
the slots written, so a cache sized for a long context costs a short answer nothing), so the shapes
change only at those steps and the position is a tensor. That is what lets ``torch.compile`` compile
the step once for every position (``compile=True``; the second span makes the slot count symbolic, and
no later span recompiles): each decoder
layer is compiled as one region (all layers share the code, so it is compiled once, not per
layer), which fuses the norms, rotary embedding, the gated activation and the residual adds into a
few C++/Triton kernels and drops the per-operator Python overhead; the matrix products stay
PyTorch's.

Prefill (the prompt) still runs through ``hidden_states``, which writes the same cache. The step
agrees with the model's ordinary forward within float rounding (attention over masked slots sums
the same terms in another order); tests/generate/test_decode_step.py states the tolerances.
Models whose rotary frequencies depend on the sequence's length (dynamic NTK, longrope) take the
ordinary path: :func:`static_step_applies` says which.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..models.kv_cache import KVCache
from ..models.rope import apply_rope, rope_cos_sin

log = logging.getLogger("loratune")


def static_step_applies(model: nn.Module, attention_mask: torch.Tensor | None = None) -> bool:
    """Whether :class:`DecodeStep` can decode ``model``: a Llama-style decoder (``models/decoder.py``) whose
    rotary angles do not depend on the length, and rows without left padding."""
    from ..models.decoder import DecoderLM

    if not isinstance(model, DecoderLM) or model.rope_switch_at() is not None:
        return False
    if any(rope.rope_type in ("dynamic", "longrope") for rope in model.config.rope.values()):
        return False
    if not _plain_layers(model):
        return False
    return attention_mask is None or bool(attention_mask.bool().all())


def _plain_layers(model: nn.Module) -> bool:
    """The step calls each layer's submodules itself, past the layer's own forward: a layer whose forward is
    hooked (FSDP2 gathers a sharded layer's weights in such hooks) or whose weights are sharded (DTensor) must
    decode through its forward instead."""
    from ..models.decoder import DecoderLayer

    for module in model.modules():
        if isinstance(module, DecoderLayer) and (module._forward_pre_hooks or module._forward_hooks):
            return False
    return all(type(p.data) is torch.Tensor for p in model.parameters())


def _layer_step(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One decoder layer for one new token: the layer's own modules, attention over the cache slots given.

    x (B, 1, C); cos/sin (1, 1, rd); k_cache/v_cache (B, nkv, S, hs), views of the cache's first S slots,
    written at slot ``pos`` (1,); keep (1, 1, 1, S) True for the slots this layer attends to. Returns (B, 1, C).
    """
    a = layer.self_attn
    B = x.shape[0]
    q, k, v = a._qkv(layer.input_layernorm(x))
    q, k = q.view(B, 1, a.n_head, a.hs), k.view(B, 1, a.n_kv, a.hs)  # (B, 1, nh, hs)
    if a.qk_norm:
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, 1, hs), (B, nkv, 1, hs)
    if a.rope:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = v.view(B, 1, a.n_kv, a.hs).transpose(1, 2)
    k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
    v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
    y = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache, v_cache, attn_mask=keep, scale=a.scale,
                                       enable_gqa=a.n_kv != a.n_head)  # (B, nh, 1, hs)
    h = a.o_proj(y.transpose(1, 2).reshape(B, 1, a.n_head * a.hs).to(x.dtype))
    if layer.sandwich:
        x = x + layer.post_attention_layernorm(h)
        return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
    x = x + h
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) of the last layer's output (B, 1, C): the final norm, then the head on one position."""
    return model.logits(model.model.norm(x)[:, -1])


MIN_SPAN = 64
"""The fewest cache slots a step attends to; beyond, the next power of two above the position."""
_COMPILED: dict[str, object] = {}


def _compiled(fn):
    """``fn`` compiled once per process (every layer and every model reuse it; torch.compile keeps one graph
    per distinct layer structure and dtype)."""
    if fn.__name__ not in _COMPILED:  # automatic dynamic shapes: a second span makes the slot count symbolic
        _COMPILED[fn.__name__] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn.__name__]


class DecodeStep:
    """One-token forwards of ``model`` over caches of up to ``max_len`` positions made by
    ``model.new_cache(..., rings=False)`` (or views of their first rows, as the serving engine passes)."""

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False) -> None:
        self.model, self.compile = model, compile
        c, p = model.config, model.model.embed_tokens.weight
        self._slots = torch.arange(max_len, device=p.device)
        kinds = set(c.layer_types)
        self._tables = {kind: rope_cos_sin(c.rope[kind], c.head_dim, c.max_position_embeddings, self._slots[None],
                                           p.dtype) for kind in kinds}  # kind -> (1, L, rd) cos, sin per position
        self._windows = {kind: c.sliding_window if kind == "sliding_attention" else None for kind in kinds}
        self._step = _compiled(_layer_step) if compile else _layer_step
        self._head = _compiled(_head) if compile else _head
        self.compile_s: float | None = None
        """Seconds the first compiled step took (compilation included); None until then or without compile."""

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) of the next token after ``tokens`` (B, 1), which are written at position ``cache.length``
        of every row (rows without padding: the rotary position is the slot)."""
        model, c, t, L = self.model, self.model.config, cache.length, cache.max_len
        if any(cache.ring):
            raise ValueError("DecodeStep needs a cache whose layers keep every position: make it with rings=False")
        if t + 1 > min(L, len(self._slots)):
            raise ValueError(f"the cache holds {L} positions; position {t} does not fit")
        span = min(L, max(MIN_SPAN, 1 << t.bit_length()))  # > t: the slots attended to, a power of two
        slots = self._slots[:span]
        pos = slots[t:t + 1]  # (1,)
        x = model.model.embed_tokens(tokens)  # (B, 1, C)
        if c.embed_scale:
            x = x * torch.tensor(c.hidden_size ** 0.5, dtype=x.dtype)
        rope, masks = {}, {}
        for kind, (cos, sin) in self._tables.items():
            rope[kind] = (cos[:, t:t + 1], sin[:, t:t + 1])  # (1, 1, rd)
            keep = slots <= t
            if self._windows[kind] is not None:
                keep = keep & (t - slots < self._windows[kind])
            masks[kind] = keep[None, None, None]  # (1, 1, 1, span)
        start = time.perf_counter() if self.compile and self.compile_s is None else None
        for i, layer in enumerate(model.model.layers):
            cos, sin = rope[layer.layer_type]
            k, v = cache.k[i][:, :, :span], cache.v[i][:, :, :span]  # views: the step writes into the cache
            x = self._step(layer, x, cos, sin, k, v, pos, masks[layer.layer_type])
        logits = self._head(model, x)  # (B, V)
        if start is not None:
            self.compile_s = time.perf_counter() - start
            log.info(f"compiled the decoding step in {self.compile_s:.1f} s")
        cache.tokens[:, t:t + 1] = tokens
        cache.length = t + 1
        return logits
