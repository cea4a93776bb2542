"""The CLI on the Llama-style families, offline: init-model --arch, info, train, eval and compare
on tiny random models with a real byte-level BPE (no ../shared needed)."""

from __future__ import annotations

import json

import pytest

from family_models import write_small_tokenizer
from loratune.cli import main


@pytest.mark.parametrize("arch, adapted", [("phi3", 2), ("gemma3_text", 12)])
@pytest.mark.slow
def test_init_info_train_eval_compare(tmp_path, capsys, arch, adapted):
    """Phi-3's tiny preset: q and v are two slices of one qkv_proj in each of 2 layers; Gemma 3's:
    q_proj and v_proj in each of 6 layers."""
    tok = tmp_path / "tok"
    tok.mkdir()
    write_small_tokenizer(tok)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"the {c} cat runs to the park and sleeps in the house {i}."}) + "\n"
                            for i, c in enumerate(["red", "blue", "green", "brown"] * 16)))
    model = tmp_path / "model"
    assert main(["init-model", "--arch", arch, "--preset", "tiny", "--tokenizer", str(tok), "--out", str(model)]) == 0
    assert json.loads((model / "config.json").read_text())["model_type"] == arch
    assert main(["info", "--model", str(model), "--lora-targets", "q,v"]) == 0
    out = capsys.readouterr().out
    assert "architecture: " in out and f"{adapted} layers adapted" in out
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\nout_dir: {tmp_path / 'run'}\nlora: {{r: 4, alpha: 32, targets: [q, v]}}\n"
                      f"data: {{source: {data}, text_field: text, val_fraction: 0.1}}\nseq_len: 16\nbatch_size: 4\n"
                      "max_steps: 3\nprecision: fp32\nsample_tokens: 0\neval_every: 0\nlog_every: 1\n")
    assert main(["train", str(recipe), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(data),
                 "--text-field", "text", "--seq-len", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] > 0 and result["examples"] == 64
    assert main(["compare", str(recipe), "--steps", "1", "--json"]) == 0
    assert "time per step" in capsys.readouterr().out
