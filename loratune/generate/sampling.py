"""Text generation with the KV cache: greedy, temperature, top-k and top-p sampling, seeded."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, NonFiniteOutput
from ..runtime.seed import check_seed
from .cpu_prepack import prepacked_linears
from .decode_step import DecodeStep, static_step_applies

log = logging.getLogger("loratune")


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


NON_FINITE_ADVICE = ("the model or its adapter computes NaN or Inf although its weights are finite (an adapter "
                     "with an extreme alpha or weights, or a model that overflows in this dtype: with --dtype "
                     "float16, try float32 or bfloat16)")
"""What every command says when a model's outputs are not finite (generate, serve, eval)."""


def check_finite_logits(logits: torch.Tensor) -> None:
    """One rule for every command that picks tokens: NaN/Inf scores are refused, never sampled from (greedy
    argmax over NaN would print a token, '!!!!' in GPT-2's vocabulary, as if nothing were wrong)."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutput(f"the next-token scores are NaN or Inf: {NON_FINITE_ADVICE}")


GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (vLLM's rule): dividing by 1e-300 would overflow the logits to
infinities, whose softmax is NaN."""


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, V) -> (B,); NaN/Inf logits raise NonFiniteOutput."""
    check_finite_logits(logits)
    if cfg.temperature < GREEDY_BELOW:
        return logits.max(dim=-1).indices  # first maximum, as argmax; faster than argmax on CPU bf16
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses p
        drop_sorted[..., 0] = False  # and always the most likely one: top_p 1e-300 is 0.0 in float32
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class LogitsProcessing:
    """OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty`` (the server's requests; ``generate``
    has no flags for them). Applied to a row's logits before sampling, as vLLM does: the bias is added; each
    token already generated in this answer loses ``presence_penalty`` once and ``frequency_penalty`` per time
    it was generated (the prompt's tokens do not count, as in OpenAI's definition)."""

    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> a number in [-100, 100] added to its logit (+100: chosen whenever greedy)."""
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: subtracted from a token's logit once per time it was already generated."""

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -2 <= value <= 2):
                raise ConfigError(f"{name} must be a number in [-2, 2], got {value!r}")
        for token, bias in self.logit_bias.items():
            if not (isinstance(bias, (int, float)) and math.isfinite(bias) and -100 <= bias <= 100):
                raise ConfigError(f"logit_bias for token {token} must be a number in [-100, 100], got {bias!r}")

    def active(self) -> bool:
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def apply(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        """One row's logits (1, V) -> adjusted float32 logits (1, V) (a new tensor)."""
        logits = logits.float().clone()
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), dtype=torch.long, device=logits.device)
            logits[0, ids] += torch.tensor(list(self.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if generated and (self.presence_penalty or self.frequency_penalty):
            counts = torch.bincount(torch.tensor(list(generated), device=logits.device),
                                    minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
            logits[0] -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0).to(logits.dtype)
        return logits


LOGPROB_FLOOR = -9999.0
"""What a logprob of -inf is reported as (JSON has no infinity; vLLM's value)."""


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under one row's logits (1, V), and the ``top`` most likely (id, logprob)
    pairs: what OpenAI's ``logprobs`` reports."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)[0]
    floor = lambda x: max(float(x), LOGPROB_FLOOR)  # noqa: E731
    best = torch.topk(logprobs, min(top, logprobs.shape[-1])) if top else None
    pairs = [(int(i), floor(v)) for v, i in zip(best.values, best.indices)] if best is not None else []
    return floor(logprobs[token]), pairs


@torch.no_grad()
def generate(model, prompts: torch.Tensor, cfg: SamplingConfig, eos_ids: Sequence[int] | None = None,
             attention_mask: torch.Tensor | None = None, use_cache: bool = True, prepack: bool = True,
             inference_mode: bool = True, static: bool = True, compile: bool = False) -> torch.Tensor:
    """Continue token ids ``prompts`` (B, T); returns the new tokens (B, <= max_new_tokens).

    A row finishes at the first of any of ``eos_ids`` (Llama 3 instruct models end a turn with
    ``<|eot_id|>`` and a text with ``<|end_of_text|>``: ``Tokenizer.eos_ids`` lists both); finished
    rows are padded with ``eos_ids[0]``. None or empty: no stop ids, every row runs all steps.
    Left-padded batches pass ``attention_mask`` (B, T).
    ``prepack`` runs the linear layers on oneDNN-prepacked weights where that applies (CPU; see
    :mod:`loratune.generate.cpu_prepack`). ``inference_mode`` False (a model sharded by FSDP2, whose
    gathering buffers must stay usable by training afterwards) runs under ``no_grad`` only.
    ``static`` decodes each token after the prompt with :class:`~loratune.generate.decode_step.DecodeStep`
    (a static cache, fixed shapes) where it applies; ``compile`` also compiles that step with torch.compile
    (once per process and layer structure; docs/serving.md says what it costs and where it helps).
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
        fast = use_cache and (static or compile) and static_step_applies(model, attention_mask)
        cache = model.new_cache(B, T + steps, rings=not fast) if use_cache else None
        step = DecodeStep(model, T + steps, compile=compile) if fast else None
        mask = None if fast else attention_mask  # rows without padding: the mask says nothing
        stop = torch.tensor(list(eos_ids), dtype=torch.long, device=prompts.device) if eos_ids else None
        done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
        seq, out = prompts, []
        step_input = prompts
        with prepacked_linears(model, rows=B) if prepack and not compile else contextlib.nullcontext():
            for i in range(steps):
                if step is not None and i > 0:  # one token after the prompt: the static step
                    logits = step(step_input, cache)  # (B, V)
                else:
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
