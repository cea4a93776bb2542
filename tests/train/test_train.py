"""loratune/train/loop.py: one loop for LoRA and full fine-tuning, on a tiny random GPT-2 and synthetic text.

Each run here is a few optimizer steps of batch 8 x 16 tokens; the runs that several tests
inspect are module fixtures, made once.
"""

from __future__ import annotations

import json
import dataclasses
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import loratune.train.session
from loratune.adapters.peft_format import load_adapter
from loratune.cli import main
from loratune.data import Batches, prepare_data
from loratune.train.loss import IGNORE, count_targets, lm_loss_sum
from loratune.adapters.lora import adapters_disabled
from loratune.models import load_model
from loratune.recipe import Recipe, load_recipe
from loratune.train.metrics import read_metrics
from loratune.train.checkpoint import list_checkpoints, load_checkpoint
from loratune.adapters.targets import inject_lora
from loratune.data.tokenizer import load_tokenizer
from loratune.train import TrainingStopped, evaluate, setup_model, train
from loratune.train.optim import make_optimizer, make_scheduler
from loratune.train.precision import autocast_for

SEQ_LEN = 16
PROBE = torch.tensor([[464, 2266, 3797, 4539, 284, 262, 2604, 290], [262, 4171, 3290, 16149, 287, 262, 7850, 13]])


def write_sentences(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Short, repetitive sentences a tiny model learns within a few steps; also question/answer fields."""
    rng = random.Random(seed)
    animals, colors = ["cat", "dog", "fox", "bird", "horse"], ["red", "blue", "green", "brown"]
    places = ["the garden", "the house", "the park", "the river"]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            a, c, p = rng.choice(animals), rng.choice(colors), rng.choice(places)
            record = {"text": f"the {c} {a} runs to {p} and sleeps in {p}.",
                      "question": f"where does the {c} {a} sleep?", "answer": f"in {p}"}
            f.write(json.dumps(record) + "\n")
    return path



@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_sentences(tmp_path_factory.mktemp("data") / "sentences.jsonl")


def make_recipe(ckpt: Path, data: Path, out: Path, *overrides: str) -> Recipe:
    return load_recipe(None, [
        f"model={ckpt}", f"data.source={data}", "data.text_field=text", f"out_dir={out}", f"seq_len={SEQ_LEN}",
        "batch_size=8", "max_steps=4", "lr=2e-2", "log_every=1", "eval_every=0", "save_every=0",
        "eval_batches=null", "data.val_fraction=0.1", "sample_tokens=0", "precision=fp32", *overrides])


def train_keeping_model(recipe: Recipe):
    """Run ``train`` and also return the model it trained (by wrapping the real setup_model)."""
    captured = {}
    real = loratune.train.session.setup_model

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        captured["model"] = out[0]
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loratune.train.session, "setup_model", spy)
        result = train(recipe, progress=False)
    return result, captured["model"].eval()


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r}


def val_batches_for(recipe: Recipe, tokenizer) -> Batches:
    """The held-out split exactly as train() makes it."""
    _, val = prepare_data(recipe.data, tokenizer, recipe.seq_len, recipe.seed)
    assert val, "the recipe should hold out validation examples"
    return Batches(val, recipe.micro_batch_size, shuffle=False, pad_id=tokenizer.eos_id, drop_last=False)


# --- LoRA --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(ckpt, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    recipe = make_recipe(ckpt, data_file, out, "max_steps=20", "eval_every=10", "save_every=10",
                         "keep_checkpoints=5", "sample_tokens=6", "sample_prompt=the red cat")
    result, model = train_keeping_model(recipe)
    return recipe, result, model


def test_lora_training_lowers_the_held_out_loss(ckpt, lora_run):
    # the sentences share one pattern, so the held-out ones test learning the pattern, not new text
    recipe, result, model = lora_run
    assert result.status == "done" and result.steps == 20
    base, _ = load_model(ckpt)
    val = val_batches_for(recipe, load_tokenizer(ckpt))
    no_autocast = autocast_for(recipe.precision, torch.device("cpu"))
    before = evaluate(base, val, torch.device("cpu"), no_autocast)
    after = evaluate(model, val, torch.device("cpu"), no_autocast)
    assert math.isclose(after, result.val_loss, rel_tol=1e-6)
    assert math.log(50257) - 0.1 < before < math.log(50257) + 0.1  # a random model is near uniform
    vals = {r["step"]: r["val_loss"] for r in read_metrics(Path(recipe.out_dir) / "metrics.jsonl") if "val_loss" in r}
    assert sorted(vals) == [0, 10, 20]  # step 0 is the untrained model's loss on the same batches
    assert math.isclose(vals[0], before, rel_tol=1e-5)
    assert before > vals[10] > vals[20]
    assert after < before - 0.3, (before, after)


def test_lora_training_changes_only_the_adapter(ckpt, lora_run):
    recipe, result, model = lora_run
    base, _ = load_model(ckpt)
    base_state = base.state_dict()
    trained = model.state_dict()
    lora_keys = {k for k in trained if ".lora_" in k}
    assert set(trained) - lora_keys == set(base_state)
    for key, tensor in base_state.items():
        assert torch.equal(trained[key], tensor), f"{key} changed during LoRA training"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_keys
    # every adapter tensor moved: B from zero, A from the seeded initialisation
    torch.manual_seed(recipe.seed)
    fresh, _ = load_model(ckpt)
    inject_lora(fresh, recipe.lora)
    initial = fresh.state_dict()
    for key in lora_keys:
        assert not torch.equal(trained[key], initial[key]), f"{key} did not train"
    assert result.trainable == sum(trained[k].numel() for k in lora_keys) == 2 * 2 * (4 * 64 + 64 * 4)
    # the checkpoints hold the adapter tensors only
    for path in list_checkpoints(Path(recipe.out_dir) / "checkpoints"):
        assert set(load_file(path / "trainable.safetensors")) == lora_keys


def test_saved_adapter_reproduces_the_trained_model(ckpt, lora_run):
    recipe, _, model = lora_run
    adapter_dir = Path(recipe.out_dir) / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    fresh, _ = load_model(ckpt)
    lora = load_adapter(fresh, adapter_dir)
    assert lora == recipe.lora
    trained = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    loaded = {k: v for k, v in fresh.state_dict().items() if ".lora_" in k}
    assert set(loaded) == set(trained)
    for key, tensor in trained.items():
        assert torch.equal(loaded[key], tensor), key
    with torch.no_grad():
        logits = fresh(PROBE)
        torch.testing.assert_close(logits, model(PROBE), rtol=0, atol=1e-6)
        with adapters_disabled(model):
            base_logits = model(PROBE)
    assert (logits - base_logits).abs().max() > 1e-3, "the adapter should change the logits"


def test_run_outputs_are_well_formed(lora_run):
    recipe, result, _ = lora_run
    out = Path(recipe.out_dir)
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) for r in records)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 21))
    for r in train_records:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["elapsed_s"] >= 0
        assert math.isclose(r["lr"], 2e-2) and r["grad_norm"] >= 0
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    val_records = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val_records] == [0, 10, 20]
    for r in val_records:
        assert math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-4)
    assert math.isclose(train_records[-1]["loss"], result.train_loss, abs_tol=1e-6)

    png = out / "loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 0.01  # a plot, not a blank canvas

    samples = json.loads((out / "samples.json").read_text(encoding="utf-8"))
    assert samples["prompt"] == "the red cat"
    for key in ("before", "after"):
        assert samples[key].startswith("the red cat") and len(samples[key]) > len("the red cat")

    assert load_recipe(out / "recipe.yaml") == dataclasses.replace(recipe, device="cpu")  # auto, resolved
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000010", "step-000020"]
    assert not (out / "model").exists()


# --- full fine-tuning --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(ckpt, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full-run")
    recipe = make_recipe(ckpt, data_file, out, "finetune=full", "max_steps=3", "lr=1e-3")
    result, model = train_keeping_model(recipe)
    return recipe, result, model


def test_full_finetuning_trains_every_weight(ckpt, full_run):
    recipe, result, model = full_run
    assert result.trainable == result.total == sum(p.numel() for p in model.parameters())
    base, _ = load_model(ckpt)
    trained = dict(model.named_parameters())
    for name, p in base.named_parameters():
        assert not torch.equal(trained[name], p), f"{name} did not change in full fine-tuning"
    assert not any(".lora_" in k for k in model.state_dict())
    assert not (Path(recipe.out_dir) / "adapter").exists()


def test_full_finetuning_exports_a_model_transformers_loads(full_run):
    from transformers import AutoModelForCausalLM

    recipe, result, model = full_run
    out = Path(recipe.out_dir) / "model"
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name
    ours, _ = load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(PROBE)
        torch.testing.assert_close(ours(PROBE), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(hf(PROBE).logits, expected, rtol=0, atol=1e-4)
    val = val_batches_for(recipe, load_tokenizer(out))
    assert math.isclose(evaluate(ours, val, torch.device("cpu"), autocast_for(recipe.precision, torch.device("cpu"))),
                        result.val_loss, rel_tol=1e-6)


# --- loss masking ------------------------------------------------------------------------------

QA = [{"question": f"where does the {c} {a} sleep?", "answer": f"in the {p}"}
      for c, a, p in [("red", "cat", "garden"), ("blue", "dog", "house"), ("green", "fox", "park"),
                      ("brown", "bird", "river"), ("red", "horse", "barn"), ("blue", "cat", "box"),
                      ("green", "dog", "yard"), ("brown", "fox", "forest and the field")]]


def test_completion_loss_is_taken_on_the_completion_only(ckpt, tmp_path):
    """The first step's loss (adapter still zero: the base model) equals cross-entropy by hand over
    the completion tokens alone; the prompt's tokens contribute nothing."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA), encoding="utf-8")
    recipe = make_recipe(ckpt, data, tmp_path / "out", "data.task=completion",
                         "data.prompt_template=Q: {question} A:", "data.completion_template= {answer}",
                         "data.val_fraction=0", "data.shuffle=false", "max_steps=1", "batch_size=8",
                         "grad_accum=2", "seq_len=32")
    assert recipe.data.completion_template == " {answer}"
    result = train(recipe, progress=False)

    base, _ = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in QA:
            prompt = tok.encode(recipe.data.prompt_template.format(**r))
            completion = tok.encode(recipe.data.completion_template.format(**r)) + [tok.eos_id]
            assert len(prompt + completion) <= recipe.seq_len + 1  # nothing cut: no truncation to mimic
            ids = torch.tensor([prompt + completion])
            logits = base(ids[:, :-1])[0]  # (T, V); position t predicts token t + 1
            targets = ids[0, 1:]
            on_completion = torch.arange(len(targets)) >= len(prompt) - 1
            assert int(on_completion.sum()) == len(completion)
            total += float(F.cross_entropy(logits[on_completion], targets[on_completion], reduction="sum"))
            count += len(completion)
    assert math.isclose(result.train_loss, total / count, rel_tol=1e-5)


class _LeafHidden(torch.nn.Module):
    """A 'model' whose final hidden states are a leaf tensor, so the loss's gradient per position can be read."""

    def __init__(self, hidden: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.hidden = torch.nn.Parameter(hidden)  # (B, T, C)
        self.lm_head = torch.nn.Linear(hidden.shape[-1], vocab, bias=False)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hidden

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden)  # (B, T, V)


def test_masked_positions_get_no_gradient(ckpt):
    from loratune.data import DataConfig, build_examples

    tok = load_tokenizer(ckpt)
    cfg = DataConfig(source="qa.jsonl", task="completion", prompt_template="{question} A:",
                     completion_template=" {answer}")
    examples = build_examples(QA[:4], cfg, tok, seq_len=SEQ_LEN)
    batch = Batches(examples, 4, shuffle=False, pad_id=tok.eos_id).batch(0, 0)
    labels = batch["labels"]  # (B, T)
    torch.manual_seed(0)
    fake = _LeafHidden(torch.randn(*labels.shape, 8), vocab=50)
    labels = torch.where(labels == IGNORE, labels, labels % 50)  # the fake's 50-token vocabulary
    loss = lm_loss_sum(fake, batch["input_ids"], labels)
    loss.backward()
    masked = labels == IGNORE
    assert masked.any() and (~masked).any()
    grad_per_position = fake.hidden.grad.abs().sum(-1)  # (B, T)
    assert torch.all(grad_per_position[masked] == 0)
    assert torch.all(grad_per_position[~masked] > 0)
    with torch.no_grad():
        expected = F.cross_entropy(fake(batch["input_ids"])[~masked], labels[~masked], reduction="sum")
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    assert count_targets(labels) == int((~masked).sum())
    # an example's labels (aligned with its tokens): nothing on the prompt, then the completion and eos
    first = examples[0]
    n_prompt = len(tok.encode(cfg.prompt_template.format(**QA[0])))
    assert first.labels == [IGNORE] * n_prompt + tok.encode(" in the garden") + [tok.eos_id]


# --- gradient accumulation and precision -------------------------------------------------------

CLIPPED = "max_grad_norm=0.1"  # below the gradient norms here: clipping acts on every step


@pytest.fixture(scope="module")
def fp32_runs(ckpt, data_file, tmp_path_factory):
    """Batch 8 as one micro-batch and as four micro-batches of 2 (fp32, 4 steps)."""
    runs = {}
    for accum in (1, 4):
        out = tmp_path_factory.mktemp(f"accum{accum}")
        recipe = make_recipe(ckpt, data_file, out, f"grad_accum={accum}", CLIPPED)
        runs[accum] = recipe, train(recipe, progress=False)
    return runs


def test_grad_accumulation_does_not_change_the_result(fp32_runs):
    (r1, res1), (r4, res4) = fp32_runs[1], fp32_runs[4]
    assert r4.micro_batch_size == 2
    grad_norms = [r["grad_norm"] for r in read_metrics(Path(r1.out_dir) / "metrics.jsonl") if "grad_norm" in r]
    assert min(grad_norms) > 0.1  # the norm before clipping
    l1, l4 = train_losses(Path(r1.out_dir)), train_losses(Path(r4.out_dir))
    assert sorted(l1) == sorted(l4) == [1, 2, 3, 4]
    for step in l1:
        assert math.isclose(l1[step], l4[step], abs_tol=1e-5), (step, l1[step], l4[step])
    assert l1[4] < l1[1] - 0.1  # the runs did learn, so equal weights are not just equal initial weights
    assert math.isclose(res1.val_loss, res4.val_loss, abs_tol=1e-5)
    a1 = load_file(Path(r1.out_dir) / "adapter" / "adapter_model.safetensors")  # whatever the keys, the same
    a4 = load_file(Path(r4.out_dir) / "adapter" / "adapter_model.safetensors")
    assert set(a1) == set(a4)
    for key in a1:
        torch.testing.assert_close(a4[key], a1[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.slow
def test_bf16_runs_track_fp32(precision, fp32_runs, ckpt, data_file, tmp_path):
    reference, ref_result = fp32_runs[1]
    recipe = make_recipe(ckpt, data_file, tmp_path, f"precision={precision}", CLIPPED)
    result, model = train_keeping_model(recipe)
    assert result.status == "done"
    ours, ref = train_losses(tmp_path), train_losses(Path(reference.out_dir))
    for step in ref:
        assert math.isfinite(ours[step])
        assert math.isclose(ours[step], ref[step], abs_tol=0.02), (precision, step, ours[step], ref[step])
    assert math.isclose(result.val_loss, ref_result.val_loss, abs_tol=0.02)
    for name, p in model.named_parameters():
        if p.requires_grad:  # LoRA master weights stay fp32
            assert p.dtype == torch.float32, name
        else:  # frozen weights are bf16 only in bf16-true
            assert p.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32), name


# --- a diverging run ---------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(ckpt, data_file, tmp_path):
    # The largest learning rate the recipe allows (10) with an absurd LoRA scale (alpha 1e20) blows the
    # adapter's update up within a few Adam steps until the logits overflow float32 and the loss
    # becomes NaN: no monkeypatching needed.
    recipe = make_recipe(ckpt, data_file, tmp_path, "lr=10", "lora.alpha=1e20", "max_steps=10", "save_every=1",
                         "keep_checkpoints=2", "max_grad_norm=null")
    with pytest.raises(TrainingStopped) as info:
        train(recipe, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    bad_step = records[-1]["step"]
    assert records[-1]["error"].startswith("non-finite")
    assert bad_step >= 2 and [r["step"] for r in records[:-1]] == list(range(1, bad_step))
    last_good = tmp_path / "checkpoints" / f"step-{bad_step - 1:06d}"
    message = str(info.value)
    assert f"at step {bad_step};" in message
    assert f"Last good checkpoint: {last_good}." in message
    assert list_checkpoints(tmp_path / "checkpoints")[-1] == last_good
    assert not (tmp_path / "adapter").exists()

    # the last good checkpoint loads, with finite weights, into a fresh run of the same recipe
    model, _, _ = setup_model(recipe, torch.device("cpu"))
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, recipe.max_steps)
    state = load_checkpoint(last_good, model, optimizer, scheduler)
    assert state.step == bad_step - 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_loss_through_the_cli_is_exit_2(ckpt, data_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {ckpt}\ndata:\n  source: {data_file}\n  text_field: text\n", encoding="utf-8")
    code = main(["train", str(recipe), "--out", str(tmp_path / "out"), "--max-steps", "10", "--no-progress",
                 "--set", f"seq_len={SEQ_LEN}", "--set", "batch_size=8", "--set", "lr=10",
                 "--set", "lora.alpha=1e20",
                 "--set", "save_every=1", "--set", "max_grad_norm=null", "--set", "sample_tokens=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"loratune train: error: loss became (nan|inf) at step \d+; stopping\. Last good checkpoint: "
                     r"\S+step-\d{6}\.", err), err
    assert "Traceback" not in err


# --- full fine-tuning with bf16 weights ---------------------------------------------------------

FULL_BF16 = ["finetune=full", "max_steps=30", "lr=3e-4", "data.val_fraction=0.2", "weight_decay=0.0"]


def _final_losses(ckpt, data_file, out: Path, precision: str) -> tuple[float, float]:
    result = train(make_recipe(ckpt, data_file, out, *FULL_BF16, f"precision={precision}"), progress=False)
    return train_losses(out)[30], result.val_loss


@pytest.mark.slow
def test_full_finetuning_in_bf16_true_tracks_fp32(ckpt, data_file, tmp_path, monkeypatch):
    """bf16-true full fine-tuning keeps every weight in bf16; Kahan-compensated AdamW keeps the
    updates that bf16 rounding would drop, so the run tracks fp32: after 30 steps at lr 3e-4 the
    training and validation losses are within 0.01 of fp32's (measured: 0.0015). Plain AdamW on the
    same bf16 weights (the optimizer swapped back in) falls 20x further behind (0.03)."""
    fp32 = _final_losses(ckpt, data_file, tmp_path / "fp32", "fp32")
    kahan = _final_losses(ckpt, data_file, tmp_path / "kahan", "bf16-true")
    start = train_losses(tmp_path / "fp32")[1]

    def plain_adamw(model, recipe):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                 betas=recipe.adam_betas, eps=recipe.adam_eps, weight_decay=0.0)

    monkeypatch.setattr(loratune.train.session, "make_optimizer", plain_adamw)
    plain = _final_losses(ckpt, data_file, tmp_path / "plain", "bf16-true")
    print(f"\nstep 1 loss {start:.4f}; step 30 train/val loss: fp32 {fp32[0]:.4f}/{fp32[1]:.4f}, "
          f"bf16-true Kahan {kahan[0]:.4f}/{kahan[1]:.4f}, bf16-true plain AdamW {plain[0]:.4f}/{plain[1]:.4f}")
    assert start - fp32[0] > 0.1  # the run learns something: the comparison is not between two flat lines
    assert abs(kahan[0] - fp32[0]) < 0.01 and abs(kahan[1] - fp32[1]) < 0.01
    assert abs(plain[1] - fp32[1]) > 2 * abs(kahan[1] - fp32[1])
