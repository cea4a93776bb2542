"""loratune/recipe.py: the tutorial recipe, --set overrides and their types, errors, YAML round trip."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from loratune.errors import ConfigError
from loratune.recipe import Recipe, dump_recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TUTORIAL = RECIPES / "gpt2_reddit_tifu.yaml"


def test_tutorial_recipe_has_the_tutorial_values():
    r = load_recipe(TUTORIAL)
    assert r.model == "gpt2" and r.finetune == "lora"
    assert (r.lora.r, r.lora.alpha, r.lora.targets) == (4, 32.0, ["q", "v"])
    assert math.isclose(r.lora.scale, 8.0)
    assert (r.batch_size, r.grad_accum, r.max_steps, r.seq_len) == (32, 1, 500, 128)
    assert math.isclose(r.lr, 5e-5) and math.isclose(r.weight_decay, 0.01)
    assert math.isclose(r.adam_eps, 1e-6) and math.isclose(r.max_grad_norm, 1.0)
    assert r.data.task == "causal_lm" and r.data.text_field == "documents"
    assert r.precision == "fp32"
    assert isinstance(r.lr, float) and isinstance(r.batch_size, int)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_round_trips(path, tmp_path):
    r = load_recipe(path)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_recipe(r), encoding="utf-8")
    assert load_recipe(dumped) == r


def test_overrides_are_coerced_to_the_field_types():
    r = load_recipe(TUTORIAL, ["lora.r=8", "lr=1e-4", "lora.targets=q,k,v", "precision=bf16-mixed",
                               "lora.alpha=16", "data.val_fraction=0", "max_grad_norm=null",
                               "adam_betas=0.8,0.95", "max_steps=null", "data.max_examples=10"])
    assert r.lora.r == 8 and type(r.lora.r) is int
    assert r.lr == 1e-4 and type(r.lr) is float  # YAML 1.1 reads '1e-4' as a string
    assert r.lora.targets == ["q", "k", "v"]
    assert r.precision == "bf16-mixed"
    assert r.lora.alpha == 16.0 and type(r.lora.alpha) is float
    assert r.data.val_fraction == 0.0 and type(r.data.val_fraction) is float
    assert r.max_grad_norm is None and r.max_steps is None
    assert r.adam_betas == (0.8, 0.95)
    assert r.data.max_examples == 10
    # untouched keys keep the file's values
    assert r.batch_size == 32 and r.data.text_field == "documents"


def test_overrides_without_a_file_start_from_the_defaults():
    r = load_recipe(None, ["batch_size=4", "grad_accum=2"])
    assert r == Recipe(batch_size=4, grad_accum=2)
    assert r.micro_batch_size == 2


@pytest.mark.parametrize("assignment, suggestion", [
    ("batchsize=4", "'batch_size'"),
    ("precison=fp32", "'precision'"),
    ("lora.target=q", "'lora.targets'"),
    ("data.textfield=x", "'data.text_field'"),
])
def test_unknown_key_suggests_the_nearest(assignment, suggestion):
    key = assignment.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_recipe(TUTORIAL, [assignment])
    message = str(info.value)
    assert f"unknown recipe key '{key}'" in message
    assert f"did you mean {suggestion}?" in message


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    with pytest.raises(ConfigError) as info:
        load_recipe(TUTORIAL, ["lora.rank=8"])
    message = str(info.value)
    assert "unknown recipe key 'lora.rank'" in message
    assert "known keys: r, alpha, dropout, targets, rslora" in message


def test_unknown_key_in_the_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("batch_size: 4\nlearning_rate: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown recipe key 'learning_rate'"):
        load_recipe(path)


@pytest.mark.parametrize("assignment, match", [
    ("precision=fp8", "precision must be one of auto, fp32, bf16-mixed, bf16-true, got 'fp8'"),
    ("batch_size=0", "batch_size must be a positive integer, got 0"),
    ("grad_accum=3", "batch_size=32 is not divisible by grad_accum=3"),
    ("finetune=qlora", "finetune must be 'lora' or 'full'"),
    ("lr=0", "lr must be a positive number"),
    ("lr=nan", "lr must be a positive number"),
    ("seq_len=abc", "seq_len: cannot read 'abc' as int"),
    ("lora.r=2.5", "lora.r: cannot read 2.5 as int"),
    ("lora.r=0", "lora.r must be a positive integer"),
    ("schedule=exp", "schedule must be one of constant, linear, cosine"),
    ("adam_betas=0.9,1.5", "adam_betas must be two numbers in"),
    ("data.task=chat", "unknown data task 'chat'"),
    ("lora=8", "lora must be a mapping"),
    ("batch_size", "--set expects key=value"),
])
def test_invalid_values_are_config_errors(assignment, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_recipe(TUTORIAL, [assignment])


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_recipe(listy)


@pytest.mark.parametrize("overrides", [
    [],
    ["lora.targets=q,k,v,attn.out", "lr=3e-4", "precision=bf16-true", "max_steps=null", "adam_betas=0.8,0.9",
     "data.task=completion", "data.val_source=val.jsonl", "max_grad_norm=null",
     "data.completion_template=TL;DR {tldr}"],
])
def test_dump_recipe_round_trips(tmp_path, overrides):
    original = load_recipe(TUTORIAL, overrides)
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_recipe(original), encoding="utf-8")
    again = load_recipe(path)
    assert again == original
    assert dump_recipe(again) == dump_recipe(original)


def test_text_fields_take_the_override_as_typed():
    """YAML would read these as a mapping, a bool, a list; a text field wants the characters."""
    r = load_recipe(TUTORIAL, ["data.task=completion", "data.prompt_template=Q: {question} A:",
                               "data.completion_template= {answer}", "model=yes", "sample_prompt=[x]",
                               "data.hub_config=null"])
    assert r.data.prompt_template == "Q: {question} A:"
    assert r.data.completion_template == " {answer}"  # the leading space is part of the template
    assert r.model == "yes" and r.sample_prompt == "[x]"
    assert r.data.hub_config is None
    assert load_recipe(TUTORIAL, ["data.completion_template={tldr}"]).data.completion_template == "{tldr}"


def test_unquoted_template_in_yaml_is_an_error_not_a_silent_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  completion_template: {tldr}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="data.completion_template: cannot read"):
        load_recipe(path)
