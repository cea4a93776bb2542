"""loratune/cli: bad values a user can type or load give one-line errors (exit 2, no traceback), never
garbage output, invalid JSON or a silent change of what was asked."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_tokenizer_files, hf_tiny, randomize_lora_
from safetensors.torch import load_file, save_file

import loratune.cli.evaluate
from loratune.adapters.lora import LoRAConfig
from loratune.adapters.peft_config import EXTRA_NAME
from loratune.adapters.peft_format import WEIGHTS_NAME, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.cli import main
from loratune.models import load_model

PROMPT = "The quick brown fox"


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting exit 2 with a one-line error; returns stderr."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "Traceback" not in captured.err, captured.err
    assert captured.out == ""
    return captured.err


def _usage_error(capsys, argv: list[str]) -> str:
    """An argparse error: exit 2 with the usage line; returns stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: loratune" in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": f"the red cat {i} sleeps in the park."}) + "\n" for i in range(6)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter(tiny_ckpt, tmp_path_factory) -> Path:
    model, _ = load_model(tiny_ckpt)
    cfg = LoRAConfig(r=2, targets=["q", "v"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=5)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", cfg, base_model=str(tiny_ckpt))


def _eval_args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "--text-field", "text", "--device", "cpu", *extra]


def _generate_args(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", PROMPT, "--max-new-tokens", "4", "--device", "cpu", *extra]


# --- recipes (train) --------------------------------------------------------------------------------

def test_train_refuses_an_infinite_weight_decay(tiny_ckpt, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_ckpt}\n", encoding="utf-8")
    err = _error(capsys, ["train", str(recipe), "--out", str(tmp_path / "out"), "--set", "weight_decay=inf"])
    assert "loratune train: error: weight_decay must be a finite number >= 0, got inf\n" == err
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_empty_recipe_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# nothing yet\n", encoding="utf-8")
    err = _error(capsys, ["train", str(recipe), "--out", str(tmp_path / "out")])
    assert f"{recipe} is empty: write the recipe's keys in it" in err


def test_train_refuses_a_yaml_number_in_a_text_field(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  text_field: 5\n", encoding="utf-8")
    err = _error(capsys, ["train", str(recipe), "--out", str(tmp_path / "out")])
    assert "data.text_field: expected text, got the number 5 (quote it in YAML)" in err


# --- NaN/Inf weights (generate, eval) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_model(tiny_ckpt, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(tiny_ckpt, path)
    tensors = load_file(path / "model.safetensors")
    key = "transformer.h.0.attn.c_attn.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][1, 2] = float("nan")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def nan_adapter(adapter, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("nan-adapter") / "adapter"
    shutil.copytree(adapter, path)
    tensors = load_file(path / WEIGHTS_NAME)
    name = max(tensors)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path, name


def test_generate_and_eval_refuse_a_model_with_nan_weights(nan_model, data_file, capsys):
    message = f"model weights in {nan_model}: tensor transformer.h.0.attn.c_attn.weight holds NaN/Inf values"
    assert message in _error(capsys, _generate_args(nan_model))
    assert message in _error(capsys, _eval_args(nan_model, data_file))


def test_generate_and_eval_refuse_an_adapter_with_inf_weights(tiny_ckpt, nan_adapter, data_file, capsys):
    path, name = nan_adapter
    message = f"adapter weights in {path}: tensor {name} holds NaN/Inf values"
    assert message in _error(capsys, _generate_args(tiny_ckpt, "--adapter", str(path)))
    assert message in _error(capsys, _eval_args(tiny_ckpt, data_file, "--adapter", str(path)))


def test_corrupt_loratune_adapter_json_is_named(tiny_ckpt, adapter, tmp_path, capsys):
    path = tmp_path / "adapter"
    shutil.copytree(adapter, path)
    (path / EXTRA_NAME).write_text("{not json", encoding="utf-8")
    err = _error(capsys, _generate_args(tiny_ckpt, "--adapter", str(path)))
    assert f"{path / EXTRA_NAME} is not valid JSON" in err
    (path / EXTRA_NAME).write_text(json.dumps({"lora": {"r": 2, "alpha": -1}}), encoding="utf-8")
    err = _error(capsys, _generate_args(tiny_ckpt, "--adapter", str(path)))
    assert f"{path / EXTRA_NAME}: 'lora' holds an invalid value (lora.alpha must be a positive number" in err


# --- eval: JSON and counts ---------------------------------------------------------------------------

def test_eval_json_is_valid_json(tiny_ckpt, data_file, capsys):
    assert main(_eval_args(tiny_ckpt, data_file, "--json", "--max-examples", "2")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 2 and math.isfinite(result["loss"]) and math.isfinite(result["perplexity"])


def test_eval_json_with_an_overflowing_perplexity_prints_null(tiny_ckpt, data_file, capsys, monkeypatch):
    monkeypatch.setattr(loratune.cli.evaluate, "evaluate", lambda *args, **kwargs: 60.0)
    assert main(_eval_args(tiny_ckpt, data_file, "--json")) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["perplexity"] is None and "Infinity" not in out


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_eval_with_a_non_finite_loss_is_an_error_not_nan_json(tiny_ckpt, data_file, capsys, monkeypatch, loss):
    monkeypatch.setattr(loratune.cli.evaluate, "evaluate", lambda *args, **kwargs: loss)
    err = _error(capsys, _eval_args(tiny_ckpt, data_file, "--json"))
    assert f"the loss on {data_file} is {loss}: the model or its adapter computes NaN or Inf" in err


@pytest.mark.parametrize("flag, value", [("--max-examples", "-3"), ("--max-examples", "0"), ("--seq-len", "0"),
                                         ("--batch-size", "-1")])
def test_eval_non_positive_counts_are_usage_errors(tiny_ckpt, data_file, capsys, flag, value):
    err = _usage_error(capsys, _eval_args(tiny_ckpt, data_file, flag, value))
    assert f"argument {flag}: must be a positive integer, got {value}" in err


def test_eval_seq_len_beyond_the_context_is_capped_with_a_notice(tiny_ckpt, data_file, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="loratune"):
        assert main(_eval_args(tiny_ckpt, data_file, "--seq-len", "100000", "--max-examples", "1")) == 0
    assert "--seq-len 100000 capped to 128, the model's context" in caplog.text
    capsys.readouterr()


# --- generate: seed and length ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [str(2 ** 64), str(10 ** 30), "-1"])
def test_generate_seed_out_of_range_is_an_error(tiny_ckpt, capsys, seed):
    err = _error(capsys, _generate_args(tiny_ckpt, "--seed", seed, "--temperature", "1"))
    assert f"seed must be an integer in [0, 2**64), got {seed}" in err


def test_generate_accepts_the_largest_seed(tiny_ckpt, capsys):
    assert main(_generate_args(tiny_ckpt, "--seed", str(2 ** 64 - 1), "--temperature", "1")) == 0
    capsys.readouterr()


def test_generate_max_new_tokens_beyond_the_context_is_capped_with_a_notice(tiny_ckpt, capsys, caplog):
    argv = ["generate", "--model", str(tiny_ckpt), "--prompt", PROMPT, "--max-new-tokens", "100000", "--device", "cpu"]
    with caplog.at_level(logging.WARNING, logger="loratune"):
        assert main(argv) == 0
    assert "max_new_tokens=100000 capped to 124: the prompt's 4 tokens and the new ones must fit the model's " \
           "context of 128" in caplog.text
    capsys.readouterr()


# --- a tokenizer larger than the model's vocabulary ---------------------------------------------------

@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small-vocab")
    hf_tiny(seed=0, vocab_size=1000).save_pretrained(path)
    copy_tokenizer_files(path)  # GPT-2's 50257 tokens
    return path


def test_a_tokenizer_larger_than_the_embedding_is_an_error(small_vocab_model, data_file, capsys):
    message = ("the tokenizer has 50257 tokens, but the model's embedding has 1000 rows (its vocab_size): ids >= 1000 "
               "would crash the embedding")
    assert message in _error(capsys, _generate_args(small_vocab_model))
    assert message in _error(capsys, _eval_args(small_vocab_model, data_file))


def test_torch_accepts_the_seed_bounds():
    """The documented range is exactly what torch.Generator takes."""
    torch.Generator().manual_seed(2 ** 64 - 1)
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(2 ** 64)
