"""loratune/train/checkpoint.py: a stopped and resumed run equals an uninterrupted one, step for step.

The runs use LoRA dropout (RNG state matters), warm-up with a decaying schedule (scheduler
state matters) and cross an epoch boundary (data position matters).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loratune.cli import main
from loratune.errors import CheckpointError, ConfigError
from loratune.recipe import Recipe, load_recipe
from loratune.train.metrics import read_metrics
from loratune.train.checkpoint import TrainState, clean_checkpoint_dir, list_checkpoints, load_checkpoint, save_checkpoint
from loratune.train import train

RESUMABLE = ["seq_len=16", "batch_size=4", "lr=2e-2", "lora.dropout=0.1", "schedule=cosine", "warmup_steps=2",
             "log_every=1", "eval_batches=null", "data.val_fraction=0.1", "sample_tokens=4",
             "sample_prompt=the red cat", "precision=fp32"]


def write_sentences(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    animals, colors = ["cat", "dog", "fox", "bird"], ["red", "blue", "green"]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            a, c = rng.choice(animals), rng.choice(colors)
            f.write(json.dumps({"text": f"the {c} {a} runs to the {c} house and sleeps."}) + "\n")
    return path



@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    # 24 records: 2 held out, 22 train = 5 batches of 4 per epoch, so 8 steps cross an epoch
    return write_sentences(tmp_path_factory.mktemp("data") / "sentences.jsonl", n=24)


def make_recipe(ckpt: Path, data: Path, out: Path, *overrides: str) -> Recipe:
    return load_recipe(None, [f"model={ckpt}", f"data.source={data}", "data.text_field=text", f"out_dir={out}",
                              *RESUMABLE, *overrides])


def stop_after(recipe: Recipe, steps: int) -> None:
    """A run of ``recipe`` that ended after ``steps`` steps, leaving its checkpoint (constant schedule:
    the run's length does not change what each step computes)."""
    assert recipe.schedule == "constant"
    assert train(dataclasses.replace(recipe, max_steps=steps), progress=False).steps == steps


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def val_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_run(out: Path, ref_losses: dict, ref_val: dict, ref_adapter: dict) -> None:
    """Same logged losses (metrics.jsonl rounds them to 6 decimals: 1.5e-6 allows one unit of that
    rounding on top of float noise between thread counts) and the same adapter."""
    got = losses(out)
    assert sorted(got) == sorted(ref_losses), "every step logged exactly once"
    for step, loss in ref_losses.items():
        assert abs(got[step] - loss) <= 1.5e-6, (step, got[step], loss)
    got_val = val_losses(out)
    assert sorted(got_val) == sorted(ref_val)
    for step, loss in ref_val.items():
        assert abs(got_val[step] - loss) <= 1.5e-6, (step, got_val[step], loss)
    got_adapter = adapter(out)
    assert set(got_adapter) == set(ref_adapter)
    for key, tensor in ref_adapter.items():
        torch.testing.assert_close(got_adapter[key], tensor, rtol=0, atol=1e-6)


# --- in process: delete the last checkpoint and resume ----------------------------------------

def test_resume_from_the_middle_equals_the_uninterrupted_run(ckpt, data_file, tmp_path):
    recipe = make_recipe(ckpt, data_file, tmp_path, "max_steps=8", "save_every=4", "eval_every=4",
                         "keep_checkpoints=3")
    full = train(recipe, progress=False)
    assert full.status == "done" and full.steps == 8
    ref_losses, ref_val, ref_adapter = losses(tmp_path), val_losses(tmp_path), adapter(tmp_path)
    ref_ckpt = load_file(tmp_path / "checkpoints" / "step-000008" / "trainable.safetensors")
    assert sorted(ref_val) == [0, 4, 8] and len(set(ref_losses.values())) == 8

    # a run that stopped after step 4: its step-8 checkpoint and outputs never happened
    shutil.rmtree(tmp_path / "checkpoints" / "step-000008")
    shutil.rmtree(tmp_path / "adapter")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000004"]

    resumed = train(recipe, resume=True, progress=False)
    assert resumed.status == "done" and resumed.steps == 8
    assert abs(resumed.val_loss - full.val_loss) <= 1e-6
    assert_same_run(tmp_path, ref_losses, ref_val, ref_adapter)
    again = load_file(tmp_path / "checkpoints" / "step-000008" / "trainable.safetensors")
    for key, tensor in ref_ckpt.items():
        assert torch.equal(again[key], tensor), key

    # the output directory now holds checkpoints: a fresh start there is refused
    with pytest.raises(ConfigError, match="already holds checkpoints: pass --resume"):
        train(recipe, progress=False)
    # a recipe with other result-changing fields is refused, naming them; forced, a recipe whose
    # trainable tensors differ still cannot load them
    other = make_recipe(ckpt, data_file, tmp_path, "max_steps=8", "lora.targets=q,k,v")
    with pytest.raises(ConfigError, match=r"lora.targets: \['q', 'v'\] -> \['q', 'k', 'v'\]"):
        train(other, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="other trainable tensors|shape"):
        train(other, resume=True, force_resume=True, progress=False)


@pytest.mark.parametrize("change, field", [("batch_size=8", "batch_size: 4 -> 8"), ("seq_len=24", "seq_len: 16 -> 24"),
                                           ("lr=1e-2", "lr: 0.02 -> 0.01")])
def test_resume_with_a_changed_recipe_is_refused_unless_forced(ckpt, data_file, tmp_path, change, field):
    recipe = make_recipe(ckpt, data_file, tmp_path, "max_steps=4", "schedule=constant")
    stop_after(recipe, 2)
    changed = make_recipe(ckpt, data_file, tmp_path, "max_steps=4", "schedule=constant", change)
    before = (tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=f"{field}.*--force-resume"):
        train(changed, resume=True, progress=False)
    assert (tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors").read_bytes() == before
    assert train(changed, resume=True, force_resume=True, progress=False).steps == 4


def test_resume_with_changed_data_is_refused(ckpt, data_file, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copyfile(data_file, data)
    recipe = make_recipe(ckpt, data, tmp_path / "out", "max_steps=4", "schedule=constant")
    stop_after(recipe, 2)
    data.write_text(data.read_text() + json.dumps({"text": "one more line of text"}) + "\n")
    with pytest.raises(ConfigError, match=r"data.source.sha256"):
        train(recipe, resume=True, progress=False)


def test_resume_ignores_fields_that_do_not_change_the_result(ckpt, data_file, tmp_path):
    recipe = make_recipe(ckpt, data_file, tmp_path, "max_steps=4", "schedule=constant")
    stop_after(recipe, 2)
    finer = make_recipe(ckpt, data_file, tmp_path, "max_steps=4", "schedule=constant", "grad_accum=2", "log_every=3")
    assert train(finer, resume=True, progress=False).steps == 4


def test_resume_without_a_checkpoint_is_a_config_error(ckpt, data_file, tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step-000004-123").mkdir(parents=True)  # a save that never finished
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint in"):
        train(make_recipe(ckpt, data_file, tmp_path, "max_steps=4"), resume=True, progress=False)


# --- checkpoint directories --------------------------------------------------------------------

def _tiny_training_state():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_list_checkpoints_ignores_temporary_and_incomplete_directories(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    root = tmp_path / "checkpoints"
    for step in (2, 10):
        save_checkpoint(root, model, optimizer, scheduler, TrainState(step=step), keep=5)
    (root / ".tmp-step-000012-4242").mkdir()
    (root / ".tmp-step-000012-4242" / "state.json").write_text('{"step": 12}')  # renamed only when complete
    (root / "step-000011").mkdir()  # no state.json: not complete
    (root / "step-7").mkdir()  # not our name
    (root / "notes.txt").write_text("x")
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000010"]  # numeric order
    assert list_checkpoints(tmp_path / "missing") == []
    assert not any(p.name.startswith(".tmp-step-000010") for p in root.iterdir())  # saves clean up after themselves


def test_keep_checkpoints_prunes_the_oldest(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        save_checkpoint(root, model, optimizer, scheduler, TrainState(step=step), keep=2)
        assert len(list_checkpoints(root)) == min(step, 2)
    assert [p.name for p in list_checkpoints(root)] == ["step-000004", "step-000005"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000005"]


def test_checkpoint_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=7, best_val_loss=1.5), keep=2)
    expected_draw = torch.rand(3)
    expected_weight = model.weight.detach().clone()
    expected_moment = optimizer.state[model.weight]["exp_avg"].clone()

    other, other_opt, other_sched = _tiny_training_state()
    with torch.no_grad():
        other.weight.zero_()
    other_opt.state[other.weight]["exp_avg"].zero_()
    other_sched.step()
    other_sched.step()
    state = load_checkpoint(path, other, other_opt, other_sched)
    assert state == TrainState(step=7, best_val_loss=1.5)
    assert torch.equal(other.weight, expected_weight)
    assert torch.equal(other_opt.state[other.weight]["exp_avg"], expected_moment)
    assert other_sched.last_epoch == scheduler.last_epoch == 1  # was 3 before loading
    assert torch.equal(torch.rand(3), expected_draw)


# --- a real interruption: SIGINT to `python -m loratune train`, then --resume --------------------

def _wait_for_first_step(proc: subprocess.Popen, metrics: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no training step logged to {metrics} within {timeout:.0f} s")


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_finishes_the_same_run(ckpt, data_file, tmp_path):
    steps = 16  # SIGINT goes out after step 1, so the run is far from done when it arrives
    recipe_file = tmp_path / "recipe.yaml"
    out = tmp_path / "interrupted"
    recipe_file.write_text(
        f"model: {ckpt}\nout_dir: {out}\nmax_steps: {steps}\nsave_every: 0\neval_every: 5\n"
        f"data:\n  source: {data_file}\n  text_field: text\n", encoding="utf-8")
    overrides = [arg for item in RESUMABLE for arg in ("--set", item)]

    reference = load_recipe(recipe_file, RESUMABLE + [f"out_dir={tmp_path / 'reference'}"])
    train(reference, progress=False)
    ref_out = tmp_path / "reference"

    command = [sys.executable, "-m", "loratune", "train", str(recipe_file), "--no-progress", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    with open(tmp_path / "first.out", "w") as stdout, open(tmp_path / "first.err", "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        try:
            _wait_for_first_step(proc, out / "metrics.jsonl")
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout_text, stderr_text = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert code == 130, f"exit {code}\n{stdout_text}\n{stderr_text}"
    assert "SIGINT received" in stderr_text and "Traceback" not in stderr_text
    stopped_at = max(losses(out))
    assert 1 <= stopped_at < steps
    assert stdout_text.startswith(f"interrupted: {stopped_at} steps")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{stopped_at:06d}"]
    assert not (out / "adapter").exists()

    done = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"done: {steps} steps")
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at:06d}'} (step {stopped_at})" in done.stderr

    assert_same_run(out, losses(ref_out), val_losses(ref_out), adapter(ref_out))
    samples = json.loads((out / "samples.json").read_text())
    assert samples == json.loads((ref_out / "samples.json").read_text())
    assert set(samples) == {"prompt", "before", "after"}
    assert (out / "loss.png").is_file()


# --- what a killed run leaves behind, tampered checkpoints, determinism ---------------------------

class _Payload:
    """Unpickling this runs a shell command: what a malicious optimizer.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_checkpoint_dir_finishes_what_a_killed_run_left(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    root = tmp_path / "checkpoints"
    for step in (3, 4):
        save_checkpoint(root, model, optimizer, scheduler, TrainState(step=step), keep=5)
    dead, alive = _dead_pid(), os.getppid()
    os.replace(root / "step-000004", root / f".old-step-000004-{dead}")  # killed between the two renames of a swap
    (root / f".tmp-step-000005-{dead}").mkdir()  # killed inside a write
    (root / f".tmp-step-000005-{dead}" / "trainable.safetensors").write_bytes(b"half")
    shutil.copytree(root / "step-000003", root / f".trash-step-000002-{dead}")  # killed while pruning
    (root / f".tmp-step-000006-{alive}").mkdir()  # a process that still runs: not ours to touch
    foreign = [".tmp-notes", "step-7", "mine", f".tmp-step-000009-{dead}-x"]
    for name in foreign:
        (root / name).mkdir()
    assert [p.name for p in list_checkpoints(root)] == ["step-000003"]

    assert clean_checkpoint_dir(root) == {"removed": 2, "restored": 1}
    assert [p.name for p in list_checkpoints(root)] == ["step-000003", "step-000004"]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["step-000003", "step-000004", f".tmp-step-000006-{alive}", *foreign])
    assert load_checkpoint(root / "step-000004", *_tiny_training_state()).step == 4
    assert clean_checkpoint_dir(tmp_path / "missing") == {"removed": 0, "restored": 0}


def test_saving_a_step_again_swaps_it_whole(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, model, optimizer, scheduler, TrainState(step=2), keep=2)
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(root, model, optimizer, scheduler, TrainState(step=2, best_val_loss=0.5), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    other = _tiny_training_state()
    assert load_checkpoint(root / "step-000002", *other) == TrainState(step=2, best_val_loss=0.5)
    assert torch.equal(other[0].weight, model.weight)


def test_a_malicious_optimizer_pickle_is_refused_on_resume_and_never_runs(ckpt, data_file, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {ckpt}\nout_dir: {out}\ndata:\n  source: {data_file}\n  text_field: text\n")
    args = ["train", str(recipe), "--no-progress", *[a for item in RESUMABLE for a in ("--set", item)],
            "--set", "max_steps=2", "--set", "save_every=1"]
    assert main(args) == 0
    last = list_checkpoints(out / "checkpoints")[-1]
    state = torch.load(last / "optimizer.pt", weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = _Payload(marker)  # the file still looks like ours
    torch.save(state, last / "optimizer.pt")

    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"loratune train: error: refusing to load {last / 'optimizer.pt'}: it is corrupt or holds more than " \
           "tensors and plain data" in err and "Traceback" not in err
    assert not marker.exists(), "resuming executed code from the optimizer pickle"
    torch.load(last / "optimizer.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_tampered_checkpoint_files_are_checkpoint_errors(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=5), keep=2)
    (path / "state.json").write_text('{"step": 9}')
    with pytest.raises(CheckpointError, match="names step 9, which does not fit the directory name"):
        load_checkpoint(path, *_tiny_training_state())
    (path / "state.json").write_text('{"step": 5}')
    torch.save({"optimizer": {}, "rng": {}}, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="does not hold the optimizer, scheduler and RNG state"):
        load_checkpoint(path, *_tiny_training_state())
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "rng": {}}, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="does not fit this run's optimizer or scheduler"):
        load_checkpoint(path, *_tiny_training_state())
    (path / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path, *_tiny_training_state())


def test_same_recipe_and_seed_give_the_same_run(ckpt, data_file, tmp_path):
    """CPU, fp32: two runs with LoRA dropout, a shuffled order and validation agree bit for bit."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        train(make_recipe(ckpt, data_file, out, "max_steps=8", "eval_every=4"), progress=False)
    keep = ("step", "loss", "grad_norm", "lr", "val_loss", "val_ppl")
    a, b = ([{k: v for k, v in r.items() if k in keep} for r in read_metrics(out / "metrics.jsonl")] for out in runs)
    assert a == b and len([r for r in a if "loss" in r]) == 8
    first, second = adapter(runs[0]), adapter(runs[1])
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_qlora_dora_pissa_run_resumes_to_the_same_result(ckpt, data_file, tmp_path):
    """The 4-bit base is quantized again on resume (deterministically), PiSSA's randomized SVD start is
    drawn again from the seed (the saved adapter's conversion needs it), DoRA's magnitudes resume."""
    extra = ("quantize=nf4", "lora.use_dora=true", "lora.init=pissa_niter_2", "activation_checkpointing=true")
    recipe = make_recipe(ckpt, data_file, tmp_path, "max_steps=6", "save_every=3", "eval_every=3", *extra)
    assert train(recipe, progress=False).steps == 6
    ref = losses(tmp_path), val_losses(tmp_path), adapter(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "adapter")
    assert train(recipe, resume=True, progress=False).steps == 6
    assert_same_run(tmp_path, *ref)


def test_a_checkpoint_from_before_the_new_fields_resumes(ckpt, data_file, tmp_path):
    """Fields added to the recipe later (quantize, lora.use_dora ...) are absent from an older checkpoint's
    record: while they keep their defaults the run computes the same thing and resumes; changed, they are named."""
    recipe = make_recipe(ckpt, data_file, tmp_path, "max_steps=4", "schedule=constant")
    stop_after(recipe, 2)
    state = tmp_path / "checkpoints" / "step-000002" / "state.json"
    info = json.loads(state.read_text())
    for key in ("quantize", "double_quant", "lora.use_dora", "lora.init", "lora.plus_ratio"):
        del info["recipe_fields"][key]
    info["recipe_hash"] = "from-an-older-version"
    state.write_text(json.dumps(info))
    tensors = state.parent / "trainable.safetensors"  # and the LoRA tensors under their names of then
    old = {k.replace(".lora.default.lora_", ".lora_"): v for k, v in load_file(tensors).items()}
    assert any(".attn.c_attn.lora_A.q" in k for k in old)
    save_file(old, str(tensors))
    quantized = make_recipe(ckpt, data_file, tmp_path, "max_steps=4", "schedule=constant", "quantize=nf4")
    with pytest.raises(ConfigError, match=r"quantize: 'none' -> 'nf4'"):
        train(quantized, resume=True, progress=False)
    assert train(recipe, resume=True, progress=False).steps == 4


# --- a run cannot go back ------------------------------------------------------------------------

def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_with_fewer_steps_than_the_run_reached_is_refused_and_changes_nothing(ckpt, data_file, tmp_path,
                                                                                       capsys):
    """It used to exit 0 ("done: 6 steps"), rewrite recipe.yaml with max_steps: 3 and log a second
    val_loss line for step 6."""
    out = tmp_path / "run"
    recipe_path = tmp_path / "recipe.yaml"  # a constant schedule: max_steps does not change what a step computes
    recipe_path.write_text(f"model: {ckpt}\nout_dir: {out}\ndata:\n  source: {data_file}\n  text_field: text\n"
                           "seq_len: 16\nbatch_size: 4\nlog_every: 1\nprecision: fp32\nsample_tokens: 0\n"
                           "max_steps: 6\neval_every: 3\nsave_every: 3\n", encoding="utf-8")
    assert main(["train", str(recipe_path), "--no-progress"]) == 0
    before = _tree(out)
    capsys.readouterr()
    assert main(["train", str(recipe_path), "--resume", "--max-steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and "is at step 6" in line[0] and "cannot go back" in line[0] \
        and "max_steps >= 6" in line[0], err
    assert _tree(out) == before, "a refused resume changed a file"
    # its own recipe.yaml (written by loratune in the run's directory) may be read back to resume it
    assert main(["train", str(out / "recipe.yaml"), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert steps == [0, 3, 6], "a resume of a finished run logs its last validation once"
    assert main(["train", str(out / "recipe.yaml"), "--resume", "--max-steps", "7", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r] == [0, 3, 6, 7]
