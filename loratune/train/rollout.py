"""GRPO's rollouts: a group of completions per prompt, sampled by loratune's engine
(:class:`~loratune.generate.engine.Engine`) from the model as it trains, with its adapter.

The engine runs the bare model's LoRA layers as they are (no banks, no copy of the weights), so each
completion comes from the current policy. Every completion has its own generator, seeded from
(recipe seed, step, item uid, completion index): what a step samples depends on its batch and these seeds,
not on any RNG state, so a resumed run samples exactly what the uninterrupted one did, and evaluation
(step -1) samples the same completions every time. The engine puts the model in eval mode
(no dropout while sampling, as generation does); the mode it had comes back afterwards.

A completion ends at a stop id (the tokenizer's EOS ids and, for a chat template, its end-of-turn
token), which it keeps as its last token (TRL trains on the EOS it samples), or after
``max_new_tokens`` tokens (truncated).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoratuneError
from ..generate.engine import Engine, Request
from ..generate.sampling import SamplingConfig
from ..recipe import GRPOConfig


def completion_seed(seed: int, step: int, uid: int, index: int) -> int:
    """The generator seed of completion ``index`` of item ``uid`` at ``step`` (-1: evaluation): a hash of
    the four, so neighbouring steps or items share no stream."""
    digest = hashlib.blake2b(f"grpo/{seed}/{step}/{uid}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63


@dataclass
class Group:
    """The completions of one prompt."""

    tokens: list[list[int]]
    """Each completion's ids, ending with its stop id unless truncated."""
    truncated: list[bool]
    """Whether it ran out of ``max_new_tokens`` before a stop id."""


def stop_ids(tokenizer) -> list[int]:
    """What a completion stops at: the tokenizer's EOS ids, and its chat template's end-of-turn token(s)."""
    ids = list(getattr(tokenizer, "eos_ids", ()) or ())
    template = getattr(tokenizer, "chat_template", None)
    if template:
        from ..data.chat import end_of_turn_ids

        try:
            ids += end_of_turn_ids(tokenizer, template)
        except LoratuneError:  # a template that cannot render the probe: EOS alone
            pass
    return list(dict.fromkeys(ids))


class Sampler:
    """Samples groups of completions with an engine sized for the batch (one KV cache of rows x G slots and
    prompt + max_new_tokens positions, made for each rollout and freed before the backward)."""

    def __init__(self, cfg: GRPOConfig, seed: int, stops: Sequence[int]) -> None:
        self.cfg, self.seed, self.stops = cfg, seed, list(stops)

    def sampling(self, step: int, uid: int, index: int) -> SamplingConfig:
        cfg = self.cfg
        return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_k=cfg.top_k or None, top_p=None if cfg.top_p >= 1.0 else cfg.top_p,
                              seed=completion_seed(self.seed, step, uid, index), stop_at_eos=True)

    def sample(self, model: nn.Module, prompts: Sequence[list[int]], uids: Sequence[int], step: int) -> list[Group]:
        """``group_size`` completions of each prompt (``uids``: the items' ids, for the seeds)."""
        G = self.cfg.group_size
        was_training = model.training
        longest = max(len(p) for p in prompts)
        try:
            engine = Engine(model, max_batch=len(prompts) * G, max_len=longest + self.cfg.max_new_tokens,
                            prefill_tokens=longest * len(prompts) * G)  # every prompt in one prefill
            requests = {}
            for b, (prompt, uid) in enumerate(zip(prompts, uids)):
                for g in range(G):
                    request = Request(list(prompt), sampling=self.sampling(step, uid, g), stop_ids=self.stops)
                    requests[request.id] = (b, g)
                    engine.submit(request)
            groups = [Group([[] for _ in range(G)], [False] * G) for _ in prompts]
            while engine.busy():
                for done in engine.step()[1]:
                    b, g = requests[done.request.id]
                    if done.reason == "error":
                        raise LoratuneError(f"sampling completion {g} of record {uids[b]} failed: {done.error}")
                    stop = [] if done.reason == "length" else [done.stop_token]
                    groups[b].tokens[g] = list(done.tokens) + stop
                    groups[b].truncated[g] = done.reason == "length"
        finally:
            model.train(was_training)
        return groups


def timed_sample(sampler: Sampler, model: nn.Module, prompts, uids, step: int) -> tuple[list[Group], float]:
    """:meth:`Sampler.sample` and its seconds (synchronized on CUDA, so the time is the sampling's)."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    groups = sampler.sample(model, prompts, uids, step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return groups, time.perf_counter() - start
