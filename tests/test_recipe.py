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
    ("lr=0", "lr must be a finite number in (0, 10], got 0.0"),
    ("lr=nan", "lr must be a finite number in (0, 10], got nan"),
    ("seq_len=abc", "seq_len: cannot read 'abc' as int"),
    ("lora.r=2.5", "lora.r: cannot read 2.5 as int"),
    ("lora.r=0", "lora.r must be a positive integer"),
    ("schedule=exp", "schedule must be one of constant, linear, cosine"),
    ("adam_betas=0.9,1.5", "adam_betas must be two numbers in"),
    ("data.task=chitchat", "unknown data task 'chitchat'"),
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
    with pytest.raises(ConfigError, match=re.escape("data.completion_template: expected text, got a mapping "
                                                    "{'tldr': None} (quote it in YAML)")):
        load_recipe(path)


# --- numbers that would make the first update NaN, or crash it -----------------------------------

@pytest.mark.parametrize("assignment, message", [
    ("weight_decay=inf", "weight_decay must be a finite number >= 0, got inf"),
    ("weight_decay=nan", "weight_decay must be a finite number >= 0, got nan"),
    ("weight_decay=-0.1", "weight_decay must be a finite number >= 0, got -0.1"),
    ("weight_decay=1e30", "lr * weight_decay must be < 1, got 5e-05 * 1e+30"),
    ("lr=1e300", "lr must be a finite number in (0, 10], got 1e+300"),
    ("lr=11", "lr must be a finite number in (0, 10], got 11.0"),
    ("lr=-inf", "lr must be a finite number in (0, 10], got -inf"),
    ("adam_eps=inf", "adam_eps must be a finite number in (0, 1], got inf"),
    ("adam_eps=0", "adam_eps must be a finite number in (0, 1], got 0.0"),
    ("adam_betas=0.9,nan", "adam_betas must be two numbers in [0, 1), got (0.9, nan)"),
    ("adam_betas=0.9,inf", "adam_betas must be two numbers in [0, 1), got (0.9, inf)"),
    ("adam_betas=0.9,0.9,0.9", "adam_betas must be two numbers in [0, 1), got (0.9, 0.9, 0.9)"),
    ("max_grad_norm=inf", "max_grad_norm must be a finite number > 0 or null (no clipping), got inf"),
    ("max_grad_norm=0", "max_grad_norm must be a finite number > 0 or null (no clipping), got 0.0"),
    ("lora.alpha=inf", "lora.alpha must be a positive number, got inf"),
    ("lora.alpha=nan", "lora.alpha must be a positive number, got nan"),
    ("lora.dropout=nan", "lora.dropout must be in [0, 1), got nan"),
    ("lora.dropout=inf", "lora.dropout must be in [0, 1), got inf"),
    ("data.val_fraction=nan", "val_fraction must be in [0, 1), got nan"),
    ("data.val_fraction=inf", "val_fraction must be in [0, 1), got inf"),
    ("seed=-1", "seed must be an integer in [0, 2**64), got -1"),
    ("seed=18446744073709551616", "seed must be an integer in [0, 2**64), got 18446744073709551616"),
    ("lr=1" + "0" * 400, "lr: cannot read 1000"),  # an integer beyond float's range
])
def test_non_finite_or_out_of_range_numbers_are_refused(assignment, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(TUTORIAL, [assignment])


def test_the_bounds_themselves_are_accepted():
    r = load_recipe(None, ["lr=10", "weight_decay=0", "adam_eps=1", "adam_betas=0,0.999", "seed=18446744073709551615"])
    assert (r.lr, r.weight_decay, r.adam_eps, r.adam_betas) == (10.0, 0.0, 1.0, (0.0, 0.999))


# --- what YAML reads as something other than text --------------------------------------------------

@pytest.mark.parametrize("yaml_text, message", [
    ("data:\n  text_field: 5\n", "data.text_field: expected text, got the number 5 (quote it in YAML)"),
    ("sample_prompt: [a, b]\n", "sample_prompt: expected text, got a list ['a', 'b'] (quote it in YAML)"),
    ("model: yes\n", "model: expected text, got the boolean true (YAML reads yes, no, on, off, true, false"),
    ("data:\n  hub_config: 1.5\n", "data.hub_config: expected text, got the number 1.5 (quote it in YAML)"),
    ("sample_prompt: 2024-01-31\n", "sample_prompt: expected text, got a date datetime.date(2024, 1, 31)"),
    ("lora:\n  targets: [q, 5]\n", "lora.targets: expected text, got the number 5 (quote it in YAML)"),
])
def test_yaml_non_text_in_a_text_field_is_an_error(tmp_path, yaml_text, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(path)


def test_quoted_yaml_and_set_text_stay_text(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  text_field: '5'\nmodel: 'yes'\n", encoding="utf-8")
    assert (load_recipe(path).data.text_field, load_recipe(path).model) == ("5", "yes")
    r = load_recipe(None, ["data.text_field=5", "sample_prompt=2024-01-31"])  # --set text is taken as typed
    assert (r.data.text_field, r.sample_prompt) == ("5", "2024-01-31")


@pytest.mark.parametrize("content", ["", "# only a comment\n\n", "---\n"])
def test_an_empty_recipe_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path} is empty: write the recipe's keys in it")):
        load_recipe(path)


@pytest.mark.parametrize("yaml_text, key", [
    ("lora:\n  alpha: yes\n", "lora.alpha"),  # was read as 1 (and the adapter written with alpha 1.0)
    ("lora:\n  r: true\n", "lora.r"),
    ("lr: on\n", "lr"),
    ("data:\n  max_examples: true\n", "data.max_examples"),  # was blamed on val_fraction
    ("lora:\n  targets: [q, true]\n", "lora.targets"),
])
def test_a_boolean_where_a_number_or_text_belongs_is_refused_by_name(tmp_path, yaml_text, key):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{key}: expected ")
    assert "boolean" in str(info.value)


@pytest.mark.parametrize("assignment, key", [("lora.alpha=yes", "lora.alpha"), ("batch_size=true", "batch_size"),
                                             ("data.max_examples=off", "data.max_examples")])
def test_a_boolean_set_where_a_number_belongs_is_refused(assignment, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected a number, got the boolean"):
        load_recipe(None, [assignment])


def test_booleans_still_read_where_booleans_belong():
    assert load_recipe(None, ["lora.rslora=yes"]).lora.rslora is True
    assert load_recipe(None, ["lora.rslora=false"]).lora.rslora is False


def _alias_bomb(levels: int = 10) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """9**10 values through aliases: the loader never expands them, and neither does the message."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    with pytest.raises(ConfigError, match=r"expands to more than 100,000 values through its YAML aliases") as info:
        load_recipe(path)
    assert len(str(info.value)) < 400


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("data:\n  template_kwargs: &x\n    again: *x\n")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_recipe(path)


def test_aliases_of_a_sane_size_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("lora: &l\n  r: 8\n  alpha: 16\n")
    assert load_recipe(path).lora.alpha == 16
