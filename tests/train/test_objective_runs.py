"""The preference and RL objectives through the whole run (``loratune train`` / ``train()``), with everything
else a run can be: the tutorial recipe on a TRL pairs file by ``--set objective=dpo`` alone, QLoRA (NF4) and
a GGUF base kept in its blocks, DoRA, a metric sink, and GRPO killed with SIGKILL mid-run and resumed.

At step 0 the adapter is zero (B = 0), so the policy is the reference: DPO's first loss is ln 2 and KTO's
0.5 whatever the base (quantized or not) and the adapter variant, which the runs below check.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gguf_files import tiny_tokenizer_meta, write_model_gguf
from loratune.cli import main
from loratune.recipe import load_recipe
from loratune.train import train
from loratune.train.checkpoint import list_checkpoints
from loratune.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "recipes" / "gpt2_reddit_tifu.yaml"
LN2 = math.log(2.0)
ANIMALS, PLACES = ["cat", "dog", "fox", "bird"], ["garden", "park", "house", "river"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """TRL's standard format: prompt / chosen / rejected text."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(48):
            a, p, q = rng.choice(ANIMALS), *rng.sample(PLACES, 2)
            f.write(json.dumps({"prompt": f"where does the {a} sleep?", "chosen": f" in the {p}.",
                                "rejected": f" the {a} sleeps in the {q} and the {p} and runs"}) + "\n")
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"where does the {ANIMALS[i % 4]} sleep", "answer": PLACES[i % 3]}) + "\n")
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama with a real BPE tokenizer (family_models), large enough weights for distinct log-probs."""
    from family_models import write_decoder, write_small_tokenizer

    path = write_decoder("llama", tmp_path_factory.mktemp("llama") / "llama", vocab_size=320)
    write_small_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny Llama GGUF whose projections are Q4_K blocks (llama.cpp's layout) and a real byte-level BPE."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    return write_model_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "Q4_K", tiny_tokenizer_meta(300))


def _run(model: Path, data: Path, out: Path, *settings: str):
    recipe = load_recipe(None, [f"model={model}", f"data.source={data}", f"out_dir={out}", "seq_len=32",
                                "batch_size=4", "max_steps=3", "lr=1e-2", "lora.dropout=0", "lora.targets=[q,v]",
                                "log_every=1", "eval_every=0", "save_every=0", "sample_tokens=0", "precision=fp32",
                                "device=cpu", "data.val_fraction=0", *settings])
    result = train(recipe, progress=False)
    return result, [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_the_tutorial_recipe_trains_dpo_on_a_trl_pairs_file_with_one_set(ckpt, pairs, tmp_path):
    """``loratune train recipes/gpt2_reddit_tifu.yaml --data pairs.jsonl --set objective=dpo``: nothing else in
    the tutorial recipe changes (its data section is a causal_lm task on reddit fields). The rows carry DPO's
    loss as ``loss`` with TRL's metrics; validation rows ``val_loss`` and the reward accuracy."""
    out = tmp_path / "run"
    code = main(["train", str(TUTORIAL), "--model", str(ckpt), "--data", str(pairs), "--set", "objective=dpo",
                 "--out", str(out), "--max-steps", "4", "--no-progress", "--set", "batch_size=4",  # a CPU test's size
                 "--set", "eval_every=2", "--set", "save_every=2", "--set", "sample_tokens=4", "--set", "log_every=1"])
    assert code == 0
    records = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in records if "loss" in r]
    val_rows = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert train_rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    assert [r["step"] for r in val_rows] == [0, 2, 4]
    assert val_rows[0]["val_loss"] == pytest.approx(LN2, abs=1e-6) and val_rows[0]["val_rewards/accuracies"] == 0
    assert all(0 <= r["val_rewards/accuracies"] <= 1 and "val_ppl" not in r for r in val_rows)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_dpo_on_a_quantized_base(llama, pairs, tmp_path, quantize):
    """QLoRA: the reference is the quantized base with the adapter off, so step 0 is still ln 2."""
    result, rows = _run(llama, pairs, tmp_path / "run", "objective=dpo", f"quantize={quantize}")
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5) and rows[-1]["loss"] < rows[0]["loss"]
    extra = json.loads((tmp_path / "run" / "adapter" / "loratune_adapter.json").read_text())
    assert extra["base_quantization"]["kind"] == quantize


def test_dora_kto_and_a_tensorboard_sink(llama, pairs, tmp_path):
    """KTO on the pairs file (TRL's unpairing) with DoRA adapters (magnitude 1 at the start: still the base), and
    the metric rows reach TensorBoard."""
    pytest.importorskip("tensorboard")
    from test_sinks import tensorboard_scalars

    result, rows = _run(llama, pairs, tmp_path / "run", "objective=kto", "lora.use_dora=true",
                        "report_to=[jsonl, tensorboard]")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard", "rewards/chosen")
    assert scalars == pytest.approx({r["step"]: r["rewards/chosen"] for r in rows}, rel=1e-6)


def test_dpo_and_grpo_on_a_gguf_base_kept_in_its_blocks(tiny_gguf, pairs, prompts, tmp_path):
    """``quantize: gguf`` (the base stays in its Q4_K blocks): DPO's reference is those blocks with the adapter
    off; GRPO samples with the engine over the same blocks and the adapter being trained."""
    result, rows = _run(tiny_gguf, pairs, tmp_path / "dpo", "objective=dpo", "quantize=gguf")
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5) and all(math.isfinite(r["loss"]) for r in rows)
    result, rows = _run(tiny_gguf, prompts, tmp_path / "grpo", "objective=grpo", "quantize=gguf",
                        "grpo.group_size=3", "grpo.max_new_tokens=6", "batch_size=2",
                        "grpo.rewards=[{type: length, max_words: 2}]")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["rollout_s"] > 0 for r in rows)
    assert all(0 <= r["reward"] <= 1 for r in rows)


GRPO_SETTINGS = ["objective=grpo", "grpo.group_size=3", "grpo.max_new_tokens=6", "grpo.temperature=1.0",
                 "grpo.beta=0.05", "grpo.rewards=[{type: length, max_words: 2}, {type: regex, field: answer}]",
                 "batch_size=2", "seq_len=32", "lr=5e-2", "lora.dropout=0", "log_every=1", "eval_every=0",
                 "save_every=1", "sample_tokens=0", "precision=fp32", "device=cpu", "data.val_fraction=0"]


@pytest.mark.slow
def test_a_grpo_run_killed_mid_run_resumes_to_the_uninterrupted_adapter(llama, prompts, tmp_path):
    """SIGKILL while GRPO trains (a checkpoint after every step), then ``--resume``: sampling depends only on
    (seed, step, prompt, completion), so the resumed run draws the same completions and ends on the same
    adapter as a run never interrupted, bit for bit, with the same losses and rewards."""
    steps = 6
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {llama}\ndata:\n  source: {prompts}\n", encoding="utf-8")
    sets = [a for s in [*GRPO_SETTINGS, f"max_steps={steps}"] for a in ("--set", s)]
    whole = train(load_recipe(recipe, [*GRPO_SETTINGS, f"max_steps={steps}", f"out_dir={tmp_path / 'whole'}"]),
                  progress=False)
    assert whole.status == "done"
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "loratune", "train", str(recipe), "--out", str(killed), "--no-progress", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    while not any(p.name.endswith("000003") for p in list_checkpoints(killed / "checkpoints")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint at step 3 within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "loss" in r}
    again = {r["step"]: r for r in read_metrics(killed / "metrics.jsonl") if "loss" in r}
    assert sorted(again) == list(range(1, steps + 1))
    for step, r in rows.items():
        assert again[step]["loss"] == r["loss"] and again[step]["reward"] == r["reward"], step
