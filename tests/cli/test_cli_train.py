"""loratune/cli/train.py: the tutorial recipe end to end on the real posts, and bad input as exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loratune.adapters.peft_format import load_adapter
from loratune.cli import main
from loratune.models import load_model
from loratune.recipe import load_recipe
from loratune.train.metrics import read_metrics

TUTORIAL = Path(__file__).resolve().parents[2] / "recipes" / "gpt2_reddit_tifu.yaml"
REDDIT = Path(__file__).resolve().parents[3] / "shared/data/reddit_tifu_long/train.jsonl"



@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Records with a 'text' field only (the tutorial recipe asks for 'documents')."""
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"sentence number {i}."}) + "\n" for i in range(40)),
                    encoding="utf-8")
    return path


def test_train_the_tutorial_recipe_end_to_end(ckpt, tmp_path, capsys):
    if not REDDIT.is_file():
        pytest.skip(f"real reddit_tifu data not found at {REDDIT}")
    out = tmp_path / "run"
    code = main(["train", str(TUTORIAL), "--model", str(ckpt), "--data", str(REDDIT), "--out", str(out),
                 "--max-steps", "4", "--no-progress", "--set", "seq_len=32", "--set", "batch_size=4",
                 "--set", "data.max_examples=120", "--set", "eval_batches=2", "--set", "sample_tokens=4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("done: 4 steps")

    lora = load_adapter(load_model(ckpt)[0], out / "adapter")
    assert (lora.r, lora.alpha, lora.targets) == (4, 32.0, ["q", "v"])

    records = read_metrics(out / "metrics.jsonl")
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [4]  # log_every 10: the last step is always logged
    assert math.isfinite(train_lines[0]["loss"]) and math.isclose(train_lines[0]["lr"], 5e-5)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]

    resolved = load_recipe(out / "recipe.yaml")
    assert resolved.model == str(ckpt) and resolved.data.source == str(REDDIT) and resolved.out_dir == str(out)
    assert (resolved.seq_len, resolved.batch_size, resolved.max_steps) == (32, 4, 4)
    assert resolved.data.text_field == "documents" and resolved.lr == 5e-5


def _train_error(ckpt: Path, data: Path, out: Path, capsys, *extra: str) -> str:
    code = main(["train", str(TUTORIAL), "--model", str(ckpt), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--no-progress", "--set", "batch_size=4", "--set", "seq_len=16", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("loratune train: error: ")]
    assert len(lines) == 1, err
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()
    return lines[0].removeprefix("loratune train: error: ")


def test_missing_data_file(ckpt, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "train.jsonl"
    message = _train_error(ckpt, missing, tmp_path / "out", capsys)
    assert message == f"data file not found: {missing}"


def test_empty_data_file(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    message = _train_error(ckpt, empty, tmp_path / "out", capsys)
    assert message == f"the data is empty: no records in {empty}"


def test_field_that_no_record_has_lists_the_fields(ckpt, text_file, tmp_path, capsys):
    message = _train_error(ckpt, text_file, tmp_path / "out", capsys)
    assert message == f"field 'documents' is not in the records of {text_file}; they have: id, text"
    # naming the right field makes the same command work
    assert main(["train", str(TUTORIAL), "--model", str(ckpt), "--data", str(text_file), "--out",
                 str(tmp_path / "ok"), "--max-steps", "1", "--no-progress", "--set", "batch_size=4",
                 "--set", "seq_len=16", "--set", "data.text_field=text", "--set", "sample_tokens=0"]) == 0


def test_seq_len_beyond_the_context_names_the_context(ckpt, text_file, tmp_path, capsys):
    message = _train_error(ckpt, text_file, tmp_path / "out", capsys, "--set", "seq_len=512",
                           "--set", "data.text_field=text")
    assert "seq_len=512 exceeds the model's context of 256 tokens" in message
    assert "seq_len <= 256" in message


def test_unknown_recipe_key(ckpt, text_file, tmp_path, capsys):
    message = _train_error(ckpt, text_file, tmp_path / "out", capsys, "--set", "batchsize=8")
    assert message == "unknown recipe key 'batchsize'; did you mean 'batch_size'?"
