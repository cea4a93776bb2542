"""The sample a run writes before and after training (samples.json): the recipe's prompt, continued."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..generate import SamplingConfig, generate
from ..generate.chat import chat_prompt
from ..recipe import Recipe


def sample_text(model: nn.Module, tokenizer, recipe: Recipe, device: torch.device, sharded: bool = False) -> str:
    """A short continuation of the recipe's sample prompt (seeded top-k sampling); for the chat task,
    the answer to it as a user message (the recipe's system prompt and template), up to the end of turn.
    ``sharded``: the model's weights are FSDP2 shards (no weight prepacking, no inference mode)."""
    if not recipe.sample_prompt or recipe.sample_tokens == 0:
        return ""
    data = recipe.data
    if data.task == "chat":
        prompt, stops = chat_prompt(tokenizer, recipe.sample_prompt, data.system_prompt, data.chat_template,
                                    **data.template_kwargs)
        shown = ""
    else:
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # as the training documents start
        prompt, stops = bos + tokenizer.encode(recipe.sample_prompt), list(tokenizer.eos_ids)
        shown = recipe.sample_prompt
    # sharded (FSDP2): every rank runs every step, as each gathers the weights (no early stop one rank could miss)
    cfg = SamplingConfig(max_new_tokens=recipe.sample_tokens, temperature=0.8, top_k=40, seed=recipe.seed,
                         stop_at_eos=not sharded)
    was_training = model.training
    model.eval()
    new = generate(model, torch.tensor([prompt], device=device), cfg, eos_ids=stops, prepack=not sharded,
                   inference_mode=not sharded)[0].tolist()
    model.train(was_training)
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    return shown + tokenizer.decode(new)


def read_samples(path: Path, prompt: str) -> dict:
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"prompt": prompt}
    return samples if isinstance(samples, dict) and samples.get("prompt") == prompt else {"prompt": prompt}
