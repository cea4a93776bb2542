"""loratune/train/compare.py (LoRA vs full fine-tuning, each in its own process) and `loratune eval --json`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loratune.cli import main
from loratune.train.compare import compare, format_table
from loratune.models import load_model
from loratune.recipe import load_recipe
from loratune.data.tokenizer import load_tokenizer

SENTENCES = [f"the {c} {a} runs to the {p} and sleeps." for c in ("red", "blue", "green")
             for a in ("cat", "dog", "fox") for p in ("house", "park")]



@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentences.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES), encoding="utf-8")
    return path


@pytest.mark.slow
def test_compare_lora_and_full_on_the_same_recipe(ckpt, data_file, tmp_path):
    recipe = load_recipe(None, [f"model={ckpt}", f"data.source={data_file}", "data.text_field=text",
                                f"out_dir={tmp_path}", "seq_len=16", "batch_size=4", "lr=1e-3"])
    n_params = sum(p.numel() for p in load_model(ckpt)[0].parameters())  # tied embeddings counted once
    n_lora = 2 * 2 * (4 * 64 + 64 * 4)  # layers x (q, v) x (A + B), r = 4

    rows = compare(recipe, steps=2)
    assert [r["finetune"] for r in rows] == ["lora", "full"]
    lora, full = rows
    assert lora["trainable"] == n_lora and lora["total"] == n_params + n_lora
    assert full["trainable"] == full["total"] == n_params
    assert lora["trainable"] < full["trainable"]
    for row in rows:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_memory"] > 0
        assert math.isfinite(row["loss"]) and math.isfinite(row["first_loss"])
    # the same data and seed, and a fresh adapter changes nothing: the first step sees the same model
    assert math.isclose(lora["first_loss"], full["first_loss"], rel_tol=1e-5)

    table = format_table(rows, steps=2)
    header, *lines = table.splitlines()
    assert header.split() == ["LoRA", "full", "full", "/", "LoRA"]
    trainable_line = next(line for line in lines if line.startswith("trainable parameters"))
    assert f"{n_lora:,}" in trainable_line and f"{n_params:,}" in trainable_line
    assert f"{n_params / n_lora:.2f}x" in trainable_line
    share = next(line for line in lines if line.startswith("share of all parameters"))
    assert f"{100 * n_lora / (n_params + n_lora):.2f}%" in share and "100.00%" in share
    assert any(line.startswith("loss at step 3") for line in lines)


def test_eval_json_reports_loss_and_perplexity(ckpt, data_file, capsys):
    assert main(["eval", "--model", str(ckpt), "--data", str(data_file), "--text-field", "text",
                 "--seq-len", "16", "--batch-size", "4", "--max-examples", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 6
    assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-5)

    # by hand: every record is its tokens + eos, cut to seq_len + 1, predicted position by position
    model, _ = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in SENTENCES[:6]:
            ids = torch.tensor((tok.encode(text) + [tok.eos_id])[:17])
            total += float(F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="sum"))
            count += len(ids) - 1
    assert result["tokens"] == count
    assert math.isclose(result["loss"], total / count, abs_tol=2e-6)
