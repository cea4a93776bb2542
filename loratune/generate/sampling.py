"""Text generation with the KV cache: greedy, temperature, top-k and top-p sampling, seeded."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .cpu_prepack import packed_linears

log = logging.getLogger("loratune")


SEED_LIMIT = 2 ** 64
"""Seeds are 0 <= seed < 2**64: what torch.Generator.manual_seed takes (an unsigned 64-bit integer)."""


def check_seed(seed: Any, name: str = "seed") -> None:
    """Refuse a seed torch cannot take, here rather than as a traceback from manual_seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in [0, 2**64), got {seed!r}")


@dataclass
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens."""
    temperature: float = 0.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Sample only from the smallest set of tokens whose probability reaches p (nucleus)."""
    seed: int | None = None
    """Seed for sampling; same seed, same text."""
    stop_at_eos: bool = True
    """Stop a sequence once it produces end-of-text."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN, which would crash torch.multinomial
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError(f"top_k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            check_seed(self.seed)


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, V) -> (B,)."""
    if cfg.temperature == 0:
        return logits.max(dim=-1).indices  # first maximum, as argmax; ~4x faster than argmax on CPU bf16
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: torch.Tensor, cfg: SamplingConfig, eos_ids: Sequence[int] | None = None,
             attention_mask: torch.Tensor | None = None, use_cache: bool = True, pack: bool = True,
             inference_mode: bool = True) -> torch.Tensor:
    """Continue token ids ``prompts`` (B, T); returns the new tokens (B, <= max_new_tokens).

    A row finishes at the first of any of ``eos_ids`` (Llama 3 instruct models end a turn with
    ``<|eot_id|>`` and a text with ``<|end_of_text|>``: ``Tokenizer.eos_ids`` lists both); finished
    rows are padded with ``eos_ids[0]``. None or empty: no stop ids, every row runs all steps.
    Left-padded batches pass ``attention_mask`` (B, T).
    ``pack`` runs the linear layers on oneDNN-packed weights where that applies (CPU; see
    :mod:`loratune.generate.cpu_prepack`). ``inference_mode`` False (a model sharded by FSDP2, whose
    gathering buffers must stay usable by training afterwards) runs under ``no_grad`` only.
    """
    with torch.inference_mode(inference_mode):
        B, T = prompts.shape
        limit = model.config.context_length
        steps = min(cfg.max_new_tokens, limit - T)
        if steps <= 0 and cfg.max_new_tokens > 0:
            raise ConfigError(f"prompt of {T} tokens leaves no room in the context of {limit}")
        if steps < cfg.max_new_tokens:
            log.warning(f"max_new_tokens={cfg.max_new_tokens} capped to {steps}: the prompt's {T} tokens and the "
                        f"new ones must fit the model's context of {limit}")
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(device=prompts.device).manual_seed(cfg.seed)
        cache = model.new_cache(B, T + steps) if use_cache else None
        mask = attention_mask
        stop = torch.tensor(list(eos_ids), dtype=torch.long, device=prompts.device) if eos_ids else None
        done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
        seq, out = prompts, []
        step_input = prompts
        with packed_linears(model, rows=B) if pack else contextlib.nullcontext():
            for _ in range(steps):
                if cache is not None:
                    hidden = model.hidden_states(step_input, cache=cache, attention_mask=mask)
                else:
                    hidden = model.hidden_states(seq, attention_mask=mask)
                logits = model.logits(hidden[:, -1])  # (B, V): the head runs on the last position only
                token, done = _pick(logits, cfg, generator, stop, done)
                out.append(token)
                step_input = token[:, None]
                if cache is None:  # without a cache every step re-reads the whole sequence
                    seq = torch.cat([seq, step_input], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones_like(step_input, dtype=mask.dtype)], dim=1)
                if stop is not None and cfg.stop_at_eos and bool(done.all()):
                    break
        if not out:
            return prompts.new_zeros(B, 0)
        return torch.stack(out, dim=1)


def _pick(logits: torch.Tensor, cfg: SamplingConfig, generator, stop: torch.Tensor | None, done: torch.Tensor):
    """The next token per row; rows already finished get the first stop id ``stop[0]``."""
    token = next_token(logits, cfg, generator)  # (B,)
    if stop is not None:
        token = torch.where(done, stop[0], token)
        done = done | torch.isin(token, stop)
    return token, done
