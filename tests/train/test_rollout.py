"""loratune/train/rollout.py: GRPO's rollouts through loratune's engine, on a tiny random Llama with LoRA.

Seeded per completion (the same step samples the same completions whatever the RNG state; another step or
evaluation samples others), with the adapter as it is now (changing B changes the completions), G completions
per prompt ending at a stop id (kept) or at max_new_tokens, and the model's train mode given back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_
from family_models import generate_alone, write_decoder, write_small_tokenizer

from loratune.adapters.lora import LoRAConfig, lora_layers
from loratune.adapters.targets import inject_lora
from loratune.data.tokenizer import load_tokenizer
from loratune.errors import LoratuneError
from loratune.models import load_model
from loratune.recipe import GRPOConfig
from loratune.train.rollout import Sampler, completion_seed, stop_ids

PROMPTS = [[5, 17, 33, 40], [8, 9, 10, 11, 12, 13], [70, 71]]
UIDS = [0, 4, 9]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = write_decoder("llama", tmp_path_factory.mktemp("rollout") / "base", num_hidden_layers=2)
    write_small_tokenizer(path)
    return path


@pytest.fixture
def model(base):
    model, _ = load_model(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "v"]))
    randomize_lora_(model, seed=1, std=0.5)
    return model.train()


def _sampler(stops=(0,), **grpo) -> Sampler:
    return Sampler(GRPOConfig(**{"group_size": 3, "max_new_tokens": 8, "rewards": [], **grpo}), seed=7, stops=stops)


def test_same_step_same_completions_other_steps_differ(model):
    sampler = _sampler()
    first = sampler.sample(model, PROMPTS, UIDS, step=3)
    torch.manual_seed(1234)  # the global RNG plays no part
    torch.rand(10)
    assert sampler.sample(model, PROMPTS, UIDS, step=3) == first
    assert sampler.sample(model, PROMPTS, UIDS, step=4) != first
    assert sampler.sample(model, PROMPTS, UIDS, step=-1) == sampler.sample(model, PROMPTS, UIDS, step=-1) != first
    tokens = [t for g in first for t in g.tokens]
    assert len({tuple(t) for t in tokens}) > 1, "the completions of a group differ"
    assert completion_seed(7, 3, 0, 1) != completion_seed(7, 3, 0, 2) != completion_seed(7, 4, 0, 1)


def test_each_completion_is_what_generate_gives_alone(model):
    """Batched in the engine (rows of other prompts and lengths beside it, the last row alone at the end), each
    completion is what ``generate`` samples for its prompt alone with the adapter and the completion's seed."""
    sampler = _sampler(stops=list(range(0, 320, 3)))
    groups = sampler.sample(model, PROMPTS, UIDS, step=5)
    model.eval()
    base_differs = False
    for prompt, uid, group in zip(PROMPTS, UIDS, groups):
        for g, tokens in enumerate(group.tokens):
            cfg = sampler.sampling(5, uid, g)
            alone = generate_alone(model, prompt, "default", cfg, sampler.stops)
            assert tokens[:len(alone)] == alone and len(tokens) - len(alone) == (not group.truncated[g])
            base_differs |= generate_alone(model, prompt, None, cfg, sampler.stops) != alone
    assert base_differs, "the adapter must change what is sampled, or the comparison shows nothing"


def test_the_current_adapter_samples(model):
    """The engine runs the LoRA layers as they are: a changed B changes the completions (same seeds)."""
    sampler = _sampler(temperature=0.7)
    before = sampler.sample(model, PROMPTS, UIDS, step=0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for B in layer.lora_B.values():
                B.mul_(-3.0)
    assert sampler.sample(model, PROMPTS, UIDS, step=0) != before


def test_groups_stop_at_a_stop_id_or_the_length(model):
    """G completions per prompt; each ends with its stop id (kept: TRL trains on the EOS) and holds no earlier
    one, or is max_new_tokens long and marked truncated. Half the vocabulary stops, so both kinds occur."""
    stops = list(range(0, 320, 2))
    groups = _sampler(stops=stops).sample(model, PROMPTS, UIDS, step=0)
    assert len(groups) == 3 and all(len(g.tokens) == 3 == len(g.truncated) for g in groups)
    kinds = set()
    for g in groups:
        for tokens, truncated in zip(g.tokens, g.truncated):
            assert not any(t in stops for t in tokens[:-1])
            assert (tokens[-1] in stops) == (not truncated)
            assert len(tokens) <= 8 and (len(tokens) == 8 or not truncated)
            kinds.add(truncated)
    assert kinds == {True, False}


def test_a_failed_sample_names_the_record_and_gives_the_mode_back(model):
    with torch.no_grad():
        next(iter(next(lora_layers(model))[1].lora_B.values())).fill_(float("nan"))
    with pytest.raises(LoratuneError, match=r"sampling completion 0 of record 0 failed: sampling failed: the "
                                            r"next-token scores are NaN or Inf"):
        _sampler().sample(model, PROMPTS, UIDS, step=0)
    assert model.training


@pytest.mark.parametrize("training", [True, False])
def test_the_model_keeps_its_mode(model, training):
    model.train(training)
    _sampler().sample(model, PROMPTS, UIDS, step=0)
    assert model.training == training
    assert all(m.training == training for m in model.modules())


def test_stop_ids_are_the_eos_ids_and_the_chat_end_of_turn(base):
    tokenizer = load_tokenizer(base)
    assert stop_ids(tokenizer) == list(tokenizer.eos_ids) and 0 in tokenizer.eos_ids
    shared = Path(__file__).resolve().parents[3] / "shared/tokenizers/llama3_1"
    if not shared.is_dir():
        pytest.skip("../shared/tokenizers is absent")
    llama = load_tokenizer(shared)
    assert llama.decode([stop_ids(llama)[-1]]) == "<|eot_id|>" and set(llama.eos_ids) <= set(stop_ids(llama))
