"""Crash safety: `python -m loratune train` killed with SIGKILL at random moments, then `--resume`.

One run of 40 steps, a checkpoint after every step (so writes are frequent), is killed 22 times:
at a random moment after its start (mostly during start-up: imports, loading, resuming), a
random instant after a step is logged (in the step or in the checkpoint write that follows),
or the moment a checkpoint's temporary directory appears (inside the write). After each kill
the checkpoints on disk are checked (every complete one loads; a kill that left a temporary
directory landed inside a write) and the run is started again with ``--resume`` (or afresh when
no checkpoint exists yet); the resumed process must name the newest complete checkpoint. Then a
SIGTERM must save and exit with status 130, and a last ``--resume`` finishes. The result must
equal an uninterrupted run: every step's loss and every validation loss in metrics.jsonl, and
the final adapter (fp32, <= 1e-6; in practice bit for bit).

The kill counts (where they landed) are printed; `pytest -s tests/train/test_crash.py` shows them.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratune.hub.files import read_json
from loratune.cli import main
from loratune.recipe import load_recipe
from loratune.train.metrics import read_metrics
from loratune.train.checkpoint import list_checkpoints
from loratune.train import train

STEPS = 40
KILLS = 22
SEED = 20240611
SETTINGS = {
    "max_steps": STEPS, "save_every": 1, "keep_checkpoints": 2, "log_every": 1, "eval_every": 10,
    "eval_batches": None, "seq_len": 16, "batch_size": 4, "lr": 2e-2, "schedule": "cosine", "warmup_steps": 2,
    "sample_tokens": 4, "sample_prompt": "the red cat",
}
SCRATCH = re.compile(r"^\.(tmp|old|trash)-step-\d{6,}-\d+$")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init-model", "--preset", "tiny", "--out", str(path)]) == 0
    return path


def write_recipe(tmp_path: Path, ckpt: Path, out: Path) -> Path:
    rng = random.Random(0)
    data = tmp_path / "sentences.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for _ in range(48):  # 5 held out, 43 train: 10 batches of 4 per epoch, 4 epochs in 40 steps
            a, c = rng.choice(["cat", "dog", "fox", "bird"]), rng.choice(["red", "blue", "green"])
            f.write(json.dumps({"text": f"the {c} {a} runs to the {c} house and sleeps."}) + "\n")
    recipe = {"model": str(ckpt), "out_dir": str(out), **SETTINGS,
              "lora": {"dropout": 0.1}, "data": {"source": str(data), "text_field": "text", "val_fraction": 0.1}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe), encoding="utf-8")  # JSON is YAML
    return path


class Run:
    """One `python -m loratune train` process, its output in files."""

    count = 0

    def __init__(self, recipe: Path, out: Path, logs: Path, resume: bool) -> None:
        Run.count += 1
        self.stdout, self.stderr = logs / f"run{Run.count}.out", logs / f"run{Run.count}.err"
        self.metrics = out / "metrics.jsonl"
        self.start, self.start_ns = time.monotonic(), time.time_ns()
        command = [sys.executable, "-m", "loratune", "train", str(recipe), "--no-progress"]
        with open(self.stdout, "w") as so, open(self.stderr, "w") as se:
            self.proc = subprocess.Popen(command + (["--resume"] if resume else []), stdout=so, stderr=se, env=ENV)

    def logged_steps(self) -> list[int]:
        """Steps this process logged (lines of an earlier process count only once this one rewrote the file)."""
        try:
            if self.metrics.stat().st_mtime_ns < self.start_ns:
                return []
            lines = self.metrics.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return [int(m.group(1)) for m in map(re.compile(r'^\{"step": (\d+), "loss"').match, lines) if m]

    def wait_for_step_after(self, step: int, timeout: float = 60.0) -> None:
        """Until a step past ``step`` is logged (or the process ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(s > step for s in self.logged_steps()):
                return
            time.sleep(0.005)
        if self.proc.poll() is None:
            self.proc.kill()
            pytest.fail(f"no step past {step} within {timeout:.0f} s\n{self.stderr.read_text()}")

    def wait_for_write(self, root: Path, timeout: float = 60.0) -> None:
        """Until a checkpoint's temporary directory exists (or the process ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if any(e.name.startswith(".tmp-step-") for e in os.scandir(root)):
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.0005)

    def errors(self) -> str:
        return self.stderr.read_text()


def scratch_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if SCRATCH.match(p.name)) if root.is_dir() else []


def resumable_step(root: Path) -> int:
    """The step --resume must continue from: the newest complete checkpoint, or one caught mid-swap."""
    newest = check_checkpoints(root)
    for name in scratch_dirs(root):
        kind, step = name.split("-")[0], int(name.split("-")[2])
        if kind == ".old" and step > newest and not (root / f"step-{step:06d}").exists():
            newest = step
    return newest


def check_checkpoints(root: Path) -> int:
    """Every complete checkpoint loads (weights_only) and names its own step; returns the newest step."""
    found = list_checkpoints(root)
    for path in found:
        step = read_json(path / "state.json", "state")["step"]
        assert path.name == f"step-{step:06d}"
        assert load_file(path / "trainable.safetensors")
        torch.load(path / "optimizer.pt", weights_only=True)
    return int(found[-1].name.split("-")[1]) if found else 0


def by_step(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if key in r}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_as_the_uninterrupted_run(ckpt, tmp_path):
    out, logs = tmp_path / "killed", tmp_path / "logs"
    logs.mkdir()
    recipe = write_recipe(tmp_path, ckpt, out)
    root = out / "checkpoints"
    rng = random.Random(SEED)
    started = time.monotonic()

    reference = train(load_recipe(recipe, [f"out_dir={tmp_path / 'reference'}"]), progress=False)
    assert reference.status == "done" and reference.steps == STEPS

    kills: list[dict] = []
    startup = 3.0  # seconds from spawn to the first step; measured on the first run below
    while len(kills) < KILLS:
        newest = resumable_step(root)
        run = Run(recipe, out, logs, resume=newest > 0)
        mode = rng.choices(["anytime", "after-step", "in-write"], weights=[3, 4, 4])[0] if kills else "after-step"
        if mode == "anytime":
            time.sleep(rng.uniform(0.05, startup + 0.2))
        elif mode == "after-step":
            run.wait_for_step_after(newest)
            if not kills:
                startup = time.monotonic() - run.start
            time.sleep(rng.uniform(0.0, 0.06))
        else:
            run.wait_for_write(root)
        code = run.proc.poll()
        assert code is None, f"the run ended by itself (exit {code}) before kill {len(kills) + 1}\n{run.errors()}"
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait()
        logged = run.logged_steps()
        left = scratch_dirs(root)
        kills.append({"mode": mode, "fresh": newest == 0, "stepped": any(s > newest for s in logged),
                      "scratch": left, "newest_after": check_checkpoints(root)})
        resumed = re.search(r"resumed from \S+ \(step (\d+)\)", run.errors())
        assert not resumed or int(resumed.group(1)) == newest, "resumed from another than the newest checkpoint"
        assert "Traceback" not in run.errors(), run.errors()

    # SIGTERM: saves at the next step boundary and exits with 130; the checkpoint is the step it stopped at
    newest = check_checkpoints(root)
    run = Run(recipe, out, logs, resume=newest > 0)
    run.wait_for_step_after(newest)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=60) == 130, run.errors()
    stopped = max(run.logged_steps())
    assert "SIGTERM received" in run.errors() and "Traceback" not in run.errors()
    assert run.stdout.read_text().startswith(f"interrupted: {stopped} steps")
    assert check_checkpoints(root) == stopped < STEPS
    assert not (out / "adapter").exists()

    run = Run(recipe, out, logs, resume=True)
    assert run.proc.wait(timeout=300) == 0, run.errors()
    assert f"(step {stopped})" in run.errors() and run.stdout.read_text().startswith(f"done: {STEPS} steps")
    assert scratch_dirs(root) == [] and not list(out.glob(".tmp-*"))

    # the same run as the uninterrupted one: every loss, every validation loss, the adapter
    ref = tmp_path / "reference"
    for key in ("loss", "val_loss"):
        got, want = by_step(out, key), by_step(ref, key)
        assert sorted(got) == sorted(want), f"{key}: every step logged exactly once"
        assert all(abs(got[s] - want[s]) <= 1e-6 for s in want), key
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    ref_adapter = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == ref_adapter.keys()
    for key, tensor in ref_adapter.items():
        torch.testing.assert_close(adapter[key], tensor, rtol=0, atol=1e-6)
    identical = all(torch.equal(adapter[k], t) for k, t in ref_adapter.items())

    in_write = [k for k in kills if k["scratch"]]
    summary = {
        "kills": len(kills), "sigterm": 1, "processes": Run.count, "steps": STEPS,
        "by_mode": {m: sum(k["mode"] == m for k in kills) for m in ("anytime", "after-step", "in-write")},
        "during_checkpoint_write": len(in_write),
        "left_behind": sorted({name.split("-")[0] for k in in_write for name in k["scratch"]}),
        "before_first_step_of_their_process": sum(not k["stepped"] for k in kills),
        "before_any_checkpoint": sum(k["fresh"] for k in kills),
        "adapter_bit_identical": identical, "seconds": round(time.monotonic() - started, 1),
    }
    print("\ncrash test:", json.dumps(summary))
    assert len(in_write) >= 1, "no kill landed inside a checkpoint write"
