"""The Llama-style decoder, lean: RMSNorm, rotary embeddings, grouped-query attention, gated MLP.

One implementation serves Llama 2/3.x, SmolLM, Mistral, Qwen2/2.5, Qwen3, Phi-3 and Gemma 3
text models; their differences are named fields of :class:`DecoderConfig` (qkv bias, q/k norm,
sliding-window layers, fused projections, Gemma's (1 + w) norms, scaled embeddings, sandwich
norms and soft-capping). Module names and state-dict keys are transformers' own
(``model.layers.0.self_attn.q_proj.weight`` ...), so LoRA targets and PEFT adapters use the same
names in both, and checkpoints load without key surgery.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, segment_mask
from .recompute import block_policy, run_layers
from .decoder_config import DecoderConfig
from .kv_cache import KVCache, cache_dtype
from .rope import apply_rope, rope_cos_sin


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm whose backward keeps only x and one float32 rstd per row.

    Autograd through the plain formula would keep a float32 copy of x, its square, the
    normalised x and its cast (several times x's size in bf16); the forward here computes exactly
    the same values as transformers' LlamaRMSNorm / Gemma3RMSNorm.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        if unit_offset:  # Gemma: the product in float32, then cast
            return (h * rstd * (1.0 + weight.float())).type_as(x)
        return weight * (h * rstd).to(x.dtype)  # Llama: cast, then scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd  # the normalised x, recomputed
        scale = (1.0 + weight.float()) if ctx.unit_offset else weight.float()
        g = grad.float() * scale
        grad_x = rstd * (g - n * (g * n).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            n_out = n if ctx.unit_offset else n.to(x.dtype).float()
            grad_w = (grad.float() * n_out).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None, None


class RMSNorm(nn.Module):
    """x / rms(x) * w in float32, cast back; Gemma's variant scales by (1 + w)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps, self.unit_offset)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx, self.n_head, self.n_kv = layer_idx, c.num_attention_heads, c.num_key_value_heads
        self.hs = c.head_dim
        if c.fused_qkv:
            self.qkv_proj = nn.Linear(c.hidden_size, c.q_width + 2 * c.kv_width, bias=c.qkv_bias)
        else:
            self.q_proj = nn.Linear(c.hidden_size, c.q_width, bias=c.qkv_bias)
            self.k_proj = nn.Linear(c.hidden_size, c.kv_width, bias=c.qkv_bias)
            self.v_proj = nn.Linear(c.hidden_size, c.kv_width, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.q_width, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_unit_offset)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_unit_offset)
        self.fused, self.qk_norm = c.fused_qkv, c.qk_norm
        self.scale = (c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else c.head_dim) ** -0.5
        self.window = c.window(layer_idx)
        self.rope = not c.rope_layers or c.rope_layers[layer_idx]

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused:
            q_w, kv_w = self.n_head * self.hs, self.n_kv * self.hs
            return self.qkv_proj(x).split((q_w, kv_w, kv_w), dim=-1)  # (B, T, q + 2 kv) -> q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.view(B, T, self.n_head, self.hs)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv, self.hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(B, T, self.n_kv, self.hs).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, L, hs), L = the keys this layer sees
            q = q.to(k.dtype)
        causal = mask is None and k.shape[2] == T and T > 1
        y = attend(q, k, v, mask, causal, self.scale, 0.0)  # grouped-query: k, v keep their n_kv heads
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hs).to(x.dtype)  # (B, nh, T, hs) -> (B, T, nh*hs)
        return self.o_proj(y)


class _GatedActFn(torch.autograd.Function):
    """act(gate) * up whose backward keeps only gate and up (act(gate) is recomputed): one MLP-wide
    tensor less per layer and token than autograd through the two ops; the same values forward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        act = F.gelu(gate, approximate="tanh") if ctx.gelu else F.silu(gate)
        grad_up = grad * act if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_act = grad * up
            grad_gate = (torch.ops.aten.gelu_backward(grad_act, gate, approximate="tanh") if ctx.gelu
                         else torch.ops.aten.silu_backward(grad_act, gate))
        return grad_gate, grad_up, None


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        c = config
        if c.fused_gate_up:
            self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        else:
            self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
            self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.fused = c.fused_gate_up
        self.gelu = c.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, 2F) -> 2 x (B, T, F)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(_GatedActFn.apply(gate, up, self.gelu))  # SwiGLU, or GeGLU (Gemma)


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        c, norm = config, (lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset))
        self.input_layernorm = norm()
        self.self_attn = Attention(c, layer_idx)
        self.post_attention_layernorm = norm()  # Llama: before the MLP; Gemma 3: after attention
        if c.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(c)
        self.sandwich = c.sandwich_norm
        self.layer_type = c.layer_types[layer_idx]

    def forward(self, x: torch.Tensor, rope: dict, cache: KVCache | None, masks: dict) -> torch.Tensor:
        cos, sin = rope[self.layer_type]
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, masks[self.layer_type])
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """A Llama-style causal language model with transformers-compatible parameter names."""

    activation_checkpointing = False
    """Recompute each layer in the backward pass while training (models/recompute.py)."""
    activation_offload = False
    """With checkpointing on CUDA: keep each layer's saved input in pinned host memory."""

    def __init__(self, config: DecoderConfig, family=None) -> None:
        super().__init__()
        self.config, self._family = config, family
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def family(self):
        """This model's family spec (what code outside models/ may know about it)."""
        return self._family

    @property
    def logit_softcap(self) -> float | None:
        """cap in cap * tanh(z / cap) on the output logits, or None."""
        return self.config.final_logit_softcapping

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "DecoderLM":
        """Random N(0, std) weights, zero biases, norms at identity; for tests and `init-model`."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name.rsplit(".", 2)[-2]:
                    p.fill_(0.0 if self.config.norm_unit_offset else 1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def _positions(self, B: int, T: int, start: int, attention_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
        if attention_mask is None:
            return torch.arange(start, start + T, device=device)[None].expand(B, T)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # real tokens only

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) of token ids (B, T).

        ``attention_mask`` (B, L) marks real tokens (1) and left padding (0) over all positions so
        far, cached ones included; rotary positions then count real tokens only, as in transformers.
        ``position_ids`` (B, T) (training, no cache) marks packed rows: each example starts at
        position 0 and attends only to itself (:func:`~loratune.models.attention.segment_mask`).
        """
        if position_ids is not None:
            if cache is not None:
                raise ValueError("position_ids mark packed training rows; they take no cache")
            return self._packed(idx, position_ids)
        B, T = idx.shape
        c = self.config
        start = cache.length if cache is not None else 0
        if cache is not None and self._rope_switches(start, T):
            return self._recompute(idx, cache, attention_mask)
        if start + T > c.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {c.context_length}")
        x = self.model.embed_tokens(idx)  # (B, T, C)
        if c.embed_scale:
            x = x * torch.tensor(c.hidden_size ** 0.5, dtype=x.dtype)
        pos = self._positions(B, T, start, attention_mask, idx.device)
        rope = {kind: rope_cos_sin(c.rope[kind], c.head_dim, c.max_position_embeddings, pos, x.dtype)
                for kind in set(c.layer_types)}
        masks = {kind: _mask(cache, start, T, attention_mask, c.sliding_window if kind == "sliding_attention"
                             else None, idx.device) for kind in set(c.layer_types)}
        x = run_layers(self.model.layers, x, rope, cache, masks, **block_policy(self, cache))  # (B, T, C)
        if cache is not None:
            cache.tokens[:, start:start + T] = idx
            cache.advance(T)
        return self.model.norm(x)

    def _packed(self, idx: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states of packed rows: rotary positions restart per example, attention is block-diagonal."""
        c = self.config
        if int(position_ids.max()) >= c.context_length:
            raise ValueError(f"a packed example of {int(position_ids.max()) + 1} tokens exceeds the context "
                             f"of {c.context_length}")
        x = self.model.embed_tokens(idx)  # (B, T, C)
        if c.embed_scale:
            x = x * torch.tensor(c.hidden_size ** 0.5, dtype=x.dtype)
        kinds = set(c.layer_types)
        rope = {kind: rope_cos_sin(c.rope[kind], c.head_dim, c.max_position_embeddings, position_ids, x.dtype)
                for kind in kinds}
        masks = {kind: segment_mask(position_ids, c.sliding_window if kind == "sliding_attention" else None)
                 for kind in kinds}
        x = run_layers(self.model.layers, x, rope, None, masks, **block_policy(self, None))  # (B, T, C)
        return self.model.norm(x)

    def rope_switch_at(self) -> int | None:
        """The length past which the rotary frequencies depend on the sequence's length, or None where they
        never do: longrope switches from its short to its long factors past the original context, dynamic
        NTK stretches its base past max_position_embeddings."""
        rope = self.config.rope["full_attention"]
        if rope.rope_type == "longrope":
            return rope.original_max_position_embeddings
        return self.config.max_position_embeddings if rope.rope_type == "dynamic" else None

    def _rope_switches(self, start: int, T: int) -> bool:
        """Whether this chunk passes longrope's switch (keys cached before were rotated by the short factors)."""
        rope = self.config.rope["full_attention"]
        original = rope.original_max_position_embeddings
        return rope.rope_type == "longrope" and 0 < start <= original < start + T

    def _recompute(self, idx: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the whole sequence again from an emptied cache (as transformers' Phi-3 generation does
        at that step); returns the hidden states of ``idx``'s positions only."""
        full = torch.cat([cache.tokens[:, :cache.length], idx], dim=1)  # (B, start + T)
        T = idx.shape[1]
        cache.reset()
        return self.hidden_states(full, cache, attention_mask)[:, -T:]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output-head logits (..., V) of final hidden states (..., C), soft-capped where the config says."""
        z = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return z if cap is None else torch.tanh(z / cap) * cap

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T)."""
        return self.logits(self.hidden_states(idx, cache, attention_mask, position_ids))

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers' keys, without LoRA tensors (a tied head saved once, as transformers does)."""
        tied = self.config.tie_word_embeddings
        return {k: v for k, v in self.state_dict().items()
                if ".lora_" not in k and not (tied and k == "lm_head.weight")}

    def new_cache(self, batch: int, max_len: int, rings: bool = True) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions; sliding-window
        layers keep only their window (a ring buffer, see :class:`KVCache`) unless ``rings`` is False
        (then every position, and the mask applies the window)."""
        c, p = self.config, self.model.embed_tokens.weight
        windows = [c.window(i) if rings else None for i in range(c.num_hidden_layers)]
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, min(max_len, c.context_length),
                       c.head_dim, cache_dtype(p), p.device, windows=windows)


def _mask(cache: KVCache | None, start: int, T: int, attention_mask: torch.Tensor | None, window: int | None,
          device: torch.device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, L) mask of the keys each query sees, or None for plain causal attention.

    Keys are identified by their index in the sequence (cache slots remember theirs), so padding,
    causality and the sliding window are one comparison each, for full caches and ring buffers alike.
    """
    if cache is None:
        if attention_mask is None and (window is None or T <= window):
            return None  # causal over the whole chunk: SDPA's is_causal
        k_idx = torch.arange(T, device=device)
    else:
        if attention_mask is None and window is None and (start == 0 or T == 1):
            return None  # the keys so far are exactly the causal ones
        k_idx = cache.key_index(window, T, device)  # (L,) sequence index of each key this layer sees, -1 = empty
    q_idx = torch.arange(start, start + T, device=device)
    keep = (k_idx[None, :] >= 0) & (k_idx[None, :] <= q_idx[:, None])  # (T, L)
    if window is not None:
        keep = keep & (q_idx[:, None] - k_idx[None, :] < window)
    keep = keep[None]  # (1, T, L)
    if attention_mask is not None:
        real = attention_mask.bool()[:, k_idx.clamp(min=0)]  # (B, L)
        keep = keep & real[:, None, :]
        keep = keep | (k_idx[None, None, :] == q_idx[None, :, None])  # pad rows see themselves: no NaN
    return keep[:, None]  # (B or 1, 1, T, L)
