"""loratune/train/session.py and objective.py: one training session, built from a recipe or by keyword,
steps as the loop steps it; save and resume continue it exactly; the objective is a seam (a registered
objective is what the step minimises) and an unknown one is refused before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loratune.errors import ConfigError
from loratune.train import TrainingSession, setup_model, train
from loratune.train.loss import count_targets, lm_loss_sum
from loratune.train.objective import OBJECTIVES, Objective, SFTObjective, make_objective, register_objective
from loratune.train.session import load_data, resolve_device

from test_train import make_recipe, write_sentences


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_sentences(tmp_path_factory.mktemp("data") / "sentences.jsonl")


def _session(recipe, **kwargs) -> TrainingSession:
    recipe, _ = resolve_device(recipe)
    torch.manual_seed(recipe.seed)
    return TrainingSession.from_recipe(recipe, **kwargs)


def test_from_recipe_and_by_keyword_step_alike(ckpt, data_file, tmp_path):
    """The session ``from_recipe`` makes and one built by keyword around the same model and data take the
    same steps (what the benchmarks rely on)."""
    recipe = make_recipe(ckpt, data_file, tmp_path)
    a = _session(recipe)
    resolved, device = resolve_device(recipe)
    torch.manual_seed(resolved.seed)
    model, tokenizer, model_dir = setup_model(resolved, device)
    b = TrainingSession(recipe=resolved, device=device, model=model, data=load_data(resolved, tokenizer),
                        tokenizer=tokenizer, model_dir=model_dir)
    assert a.total_steps == b.total_steps == 4
    for _ in range(3):
        assert a.step().loss == b.step().loss
    assert a.state.step == b.state.step == 3
    assert a.evaluate() == b.evaluate()
    assert a.report().trainable == b.report().trainable > 0


def test_save_and_resume_continue_the_same_steps(ckpt, data_file, tmp_path):
    recipe = make_recipe(ckpt, data_file, tmp_path, "lora.dropout=0.1")
    straight = _session(recipe)
    losses = [straight.step().loss for _ in range(4)]
    first = _session(recipe)
    first.step(), first.step()
    path = first.save(tmp_path / "checkpoints")
    again = _session(recipe)
    assert again.resume(tmp_path / "checkpoints") == path and again.state.step == 2
    assert [again.step().loss for _ in range(2)] == losses[2:]


def test_save_result_writes_the_adapter(ckpt, data_file, tmp_path):
    session = _session(make_recipe(ckpt, data_file, tmp_path))
    session.step()
    assert session.save_result(tmp_path) == tmp_path / "adapter"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_the_step_minimises_the_recipes_objective(ckpt, data_file, tmp_path, monkeypatch):
    """A registered objective (here the summed cross-entropy, not the mean) is what the step computes."""

    class Summed(SFTObjective):
        name = "summed-test"

        def weight(self, batch):
            return 1

    monkeypatch.setitem(OBJECTIVES, "summed-test", Summed)
    recipe = make_recipe(ckpt, data_file, tmp_path, "objective=summed-test", "lora.dropout=0")
    mean, summed = _session(dataclasses.replace(recipe, objective="sft")), _session(recipe)
    assert isinstance(summed.objective, Summed) and isinstance(mean.objective, SFTObjective)
    batch = mean.next_batch()
    targets = count_targets(batch["labels"])
    with torch.no_grad():
        expected = float(lm_loss_sum(summed.model, batch["input_ids"], batch["labels"]))
    assert summed.step().loss == pytest.approx(expected, rel=1e-5)
    assert mean.step().loss == pytest.approx(expected / targets, rel=1e-5)


def test_registry_and_unknown_objective(ckpt, data_file, tmp_path):
    assert isinstance(make_objective("sft"), SFTObjective)
    assert issubclass(register_objective(SFTObjective), Objective)
    with pytest.raises(ConfigError, match="objective must be one of dpo, .*sft.*, got 'dpo-typo'"):
        make_objective("dpo-typo")
    with pytest.raises(ConfigError, match="objective must be one of"):
        train(make_recipe(ckpt, data_file, tmp_path / "run", "objective=dpo-typo"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective,knobs,reason", [
    ("grpo", [], "samples its completions on each rank apart"),
    ("kto", [], "estimates its KL from the model before each step's forward"),
    ("dpo", ["preference.precompute_reference=true"], "precompute_reference runs the model over the data"),
])
def test_objectives_that_cannot_shard_refuse_fsdp_before_loading(objective, knobs, reason):
    """make_objective (the loop's first check) refuses them with the reason; dpo computing its reference in the
    step's pass is not refused."""
    from loratune.recipe import load_recipe

    with pytest.raises(ConfigError, match=f"objective {objective} cannot run with strategy: fsdp: .*{reason}"
                                          ".*use strategy: ddp"):
        make_objective(objective, load_recipe(None, [f"objective={objective}", "strategy=fsdp", *knobs]))
    assert make_objective("dpo", load_recipe(None, ["objective=dpo", "strategy=fsdp"])).name == "dpo"
