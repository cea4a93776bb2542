"""Flags a user can get wrong end with one `loratune CMD: error: ...` line and exit status 2.

``compare --steps 0`` (loratune/cli/compare.py, loratune/train/compare.py) used to run both
models and then fail with statistics' "no median for empty data"; a LoRA rank wider than the
layers (loratune/adapters/targets.py) used to train a larger-than-full update without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.cli import main
from loratune.errors import ConfigError
from loratune.recipe import load_recipe
from loratune.train import compare as compare_module


def _one_error_line(capsys, command: str, out: str = "") -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    assert captured.out.startswith(out) if out else captured.out == ""  # info prints the model first
    lines = [line for line in captured.err.splitlines() if line.startswith(f"loratune {command}: error: ")]
    assert len(lines) == 1, captured.err
    return lines[0].removeprefix(f"loratune {command}: error: ")


@pytest.fixture
def recipe_file(ckpt, tmp_path) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sentence number {i}."}) + "\n" for i in range(8)),
                    encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {ckpt}\nout_dir: {tmp_path / 'run'}\ndata:\n  source: {data}\n  text_field: text\n"
                    "seq_len: 16\nbatch_size: 2\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_compare_with_no_timed_steps_exits_2(recipe_file, capsys, monkeypatch, steps):
    monkeypatch.setattr(compare_module.mp, "get_context", lambda *a: pytest.fail("no process may start"))
    assert main(["compare", str(recipe_file), "--steps", steps]) == 2
    message = _one_error_line(capsys, "compare")
    assert message == f"--steps must be a whole number >= 1 (timed steps per mode), got {int(steps)}"


def test_compare_and_measure_refuse_zero_steps_before_any_work(recipe_file, monkeypatch):
    recipe = load_recipe(str(recipe_file), [])
    monkeypatch.setattr(compare_module.mp, "get_context", lambda *a: pytest.fail("no process may start"))
    monkeypatch.setattr(compare_module.TrainingSession, "from_recipe", lambda *a, **k: pytest.fail("no model may load"))
    with pytest.raises(ConfigError, match="--steps must be a whole number >= 1"):
        compare_module.compare(recipe, steps=0)
    with pytest.raises(ConfigError, match="--steps must be a whole number >= 1"):
        compare_module.measure(recipe, steps=0)
    with pytest.raises(ConfigError, match="warmup must be a whole number >= 0, got -1"):
        compare_module.measure(recipe, steps=1, warmup=-1)


def test_a_non_integer_steps_is_an_argparse_usage_error(recipe_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(recipe_file), "--steps", "two"])
    assert exit_info.value.code == 2
    assert "loratune compare: error: argument --steps: invalid int value: 'two'" in capsys.readouterr().err


def test_info_with_a_rank_wider_than_the_layers_exits_2(ckpt, capsys):
    assert main(["info", "--model", str(ckpt), "--lora-targets", "q,v", "--lora-r", "512"]) == 2
    assert _one_error_line(capsys, "info", out="model: ") == (
        "lora.r=512 exceeds transformer.h.0.attn.c_attn's q slice (in 64, out 64): a rank above min(in, out) "
        "is no longer low-rank; use r <= 64")
