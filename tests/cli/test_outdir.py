"""loratune/runtime/outdir.py through the real CLI: no output overwritten, one line for an --out that
cannot be used, one run at a time per directory (and a dead run's lock does not keep it), and
the CLI's top level: one line for every error, the traceback only with -v."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratune.cli import main
from loratune.runtime.outdir import LOCK_NAME, MANIFEST_NAME

TRAIN = ["--set", "seq_len=16", "--set", "batch_size=4", "--set", "max_steps=2", "--set", "sample_tokens=0",
         "--set", "data.text_field=text", "--set", "eval_every=0", "--set", "precision=fp32", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outdir-data") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat and slept."}) + "\n"
                            for i in range(24)), encoding="utf-8")
    return path


def recipe_file(tmp_path: Path, ckpt: Path, data: Path, out: Path, **extra) -> Path:
    path = tmp_path / "recipe.yaml"
    lines = [f"model: {ckpt}", f"out_dir: {out}", "data:", f"  source: {data}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (the lock file aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith(f"loratune {command}: error: ")]
    assert len(line) == 1, err
    for needle in needles:
        assert needle in line[0], line[0]
    return line[0]


def test_a_non_empty_out_is_refused_and_left_as_it_was(tmp_path, ckpt, data, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"precious")
    before = digests(out)
    assert main(["train", str(recipe_file(tmp_path, ckpt, data, out)), *TRAIN]) == 2
    one_line_error(capsys, "train", f"{out} exists and is not empty", "--resume", "--overwrite")
    assert digests(out) == before
    # --overwrite replaces only what loratune wrote: these files are not in a manifest, so it is refused too
    assert main(["train", str(recipe_file(tmp_path, ckpt, data, out)), *TRAIN, "--overwrite"]) == 2
    one_line_error(capsys, "train", "holds adapter, metrics.jsonl, which loratune did not write there",
                   MANIFEST_NAME, "move them elsewhere")
    assert digests(out) == before


def test_overwrite_removes_the_earlier_runs_checkpoints(tmp_path, ckpt, data):
    out = tmp_path / "run"
    recipe = str(recipe_file(tmp_path, ckpt, data, out))
    assert main(["train", recipe, *TRAIN, "--set", "max_steps=4", "--set", "save_every=1"]) == 0
    assert main(["train", recipe, *TRAIN, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert main(["train", recipe, *TRAIN, "--overwrite", "--resume"]) == 2


def test_a_rejected_resume_and_a_failed_run_leave_the_directory_as_it_was(tmp_path, ckpt, data, capsys):
    out = tmp_path / "run"
    recipe = str(recipe_file(tmp_path, ckpt, data, out))
    assert main(["train", recipe, *TRAIN]) == 0
    before = digests(out)
    assert main(["train", recipe, *TRAIN, "--resume", "--set", "batch_size=8"]) == 2  # another recipe: refused
    one_line_error(capsys, "train", "batch_size: 4 -> 8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train", recipe, *TRAIN, "--resume", "--data", str(empty)]) == 2  # the data is empty
    one_line_error(capsys, "train", "empty")
    assert digests(out) == before  # recipe.yaml included: it is written only once a run is validated


@pytest.mark.parametrize("case", ["a file", "under a file", "unwritable"])
@pytest.mark.parametrize("command", ["train", "merge", "init-model"])
def test_an_out_that_cannot_be_used_is_one_line(tmp_path, ckpt, data, capsys, case, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = {"a file": blocker, "under a file": blocker / "sub" / "out", "unwritable": Path("/proc/loratune-out")}[case]
    adapter = tmp_path / "adapter"
    if command == "merge":
        assert main(["train", str(recipe_file(tmp_path, ckpt, data, tmp_path / "run")), *TRAIN]) == 0
        adapter = tmp_path / "run" / "adapter"
    argv = {"train": ["train", str(recipe_file(tmp_path, ckpt, data, out)), *TRAIN],
            "merge": ["merge", "--model", str(ckpt), "--adapter", str(adapter), "--out", str(out)],
            "init-model": ["init-model", "--out", str(out)]}[command]
    capsys.readouterr()
    assert main(argv) == 2
    one_line_error(capsys, command, str(out))
    assert blocker.read_text() == "not a directory"


def test_init_model_refuses_a_missing_tokenizer_directory(tmp_path, capsys):
    assert main(["init-model", "--out", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "nope")]) == 2
    one_line_error(capsys, "init-model", "--tokenizer", "is not a directory")
    (tmp_path / "empty").mkdir()
    assert main(["init-model", "--out", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "empty")]) == 2
    one_line_error(capsys, "init-model", "no tokenizer")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


# --- one run at a time per directory -------------------------------------------------------------

def _start_long_run(tmp_path: Path, ckpt: Path, data: Path, out: Path) -> subprocess.Popen:
    recipe = recipe_file(tmp_path, ckpt, data, out)
    args = [a if a != "max_steps=2" else "max_steps=100000" for a in TRAIN]
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "train", str(recipe), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or '"loss"' not in (out / "metrics.jsonl").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the first run did not start training")
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_a_second_run_into_a_busy_directory_is_refused_and_a_dead_runs_lock_is_not_kept(tmp_path, ckpt, data,
                                                                                          capsys):
    out = tmp_path / "shared-out"
    first = _start_long_run(tmp_path, ckpt, data, out)
    try:
        assert (out / LOCK_NAME).read_text().split()[0] == str(first.pid)
        recipe = str(recipe_file(tmp_path, ckpt, data, out))
        assert main(["train", recipe, *TRAIN, "--overwrite"]) == 2
        one_line_error(capsys, "train", "in use by another loratune run", f"pid {first.pid}")
        assert main(["train", recipe, *TRAIN, "--resume"]) == 2
        one_line_error(capsys, "train", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / LOCK_NAME).is_file()  # SIGKILL left it behind: stale now
    assert main(["train", recipe, *TRAIN, "--overwrite"]) == 0  # the dead holder does not keep the directory
    assert not (out / LOCK_NAME).exists()  # released when the run ended


def test_a_lock_of_a_live_process_blocks_and_of_a_dead_one_does_not(tmp_path, ckpt, data, capsys):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        recipe = str(recipe_file(tmp_path, ckpt, data, out))
        assert main(["train", recipe, *TRAIN]) == 2
        one_line_error(capsys, "train", f"pid {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(["train", recipe, *TRAIN]) == 0  # only the stale lock was there: the directory counts as empty


# --- the CLI's top level -------------------------------------------------------------------------

def test_an_unexpected_exception_is_one_line_and_the_traceback_comes_with_v(monkeypatch, capsys, tmp_path):
    import loratune.cli.info as info

    def broken(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(info, "run", broken)
    assert main(["info", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("loratune info: internal error: unexpected RuntimeError: something inside broke")
    assert "report" in err and "-v" in err
    assert main(["-v", "info", "--model", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_an_os_error_is_one_line_with_exit_2(monkeypatch, capsys, tmp_path):
    import loratune.cli.info as info

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(info, "run", denied)
    assert main(["info", "--model", str(tmp_path)]) == 2
    one_line_error(capsys, "info", "Permission denied", str(tmp_path / "x"))


def test_no_output_directory_is_made_by_a_run_refused_before_it_starts(tmp_path, ckpt, capsys):
    out = tmp_path / "never"
    assert main(["train", str(recipe_file(tmp_path, ckpt, tmp_path / "missing.jsonl", out)), *TRAIN]) == 2
    one_line_error(capsys, "train", "missing.jsonl")
    assert not out.exists() or os.listdir(out) == []


# --- outputs never touch inputs (issue 24) -------------------------------------------------------

def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (symlinks not followed) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(tmp_path, ckpt, data) -> Path:
    """A finished LoRA run in tmp_path/run (with its manifest)."""
    out = tmp_path / "run"
    assert main(["train", str(recipe_file(tmp_path, ckpt, data, out)), *TRAIN]) == 0
    return out


def _inputs_case(case: str, tmp_path: Path, ckpt: Path, data: Path, trained: Path) -> tuple[list[str], str, str]:
    """(argv, what the message names, the path it names) for one way of pointing an output at an input."""
    import shutil

    box = tmp_path / "box"
    box.mkdir()
    recipe = str(recipe_file(tmp_path, ckpt, data, tmp_path / "elsewhere"))
    if case == "train: the base model of a full fine-tune":  # the case: RUN/model as --model, RUN as --out
        shutil.copytree(ckpt, trained / "model")
        return (["train", recipe, *TRAIN, "--model", str(trained / "model"), "--out", str(trained), "--overwrite",
                 "--set", "finetune=full"], "holds the model", str(trained / "model"))
    if case == "train: --out is the model, through '..'":
        shutil.copytree(ckpt, box / "m")
        return (["train", recipe, *TRAIN, "--model", str(box / "m"), "--out", str(box / "x" / ".." / "m"),
                 "--overwrite"], "is the model", str(box / "m"))
    if case == "train: the recipe":
        own = recipe_file(box, ckpt, data, box)
        return ["train", str(own), *TRAIN, "--out", str(box), "--overwrite"], "holds the recipe", str(own)
    if case == "train: the data, through a symlink":
        shutil.copyfile(data, box / "train.jsonl")
        (tmp_path / "link").symlink_to(box)
        return (["train", recipe, *TRAIN, "--data", str(tmp_path / "link" / "train.jsonl"), "--out", str(box),
                 "--overwrite"], "holds the data", str(box / "train.jsonl"))
    if case == "train --resume: a file of the user's as the recipe":
        own = trained / "mine.yaml"
        own.write_text(Path(recipe_file(box, ckpt, data, trained)).read_text())
        return ["train", str(own), *TRAIN, "--resume"], "holds the recipe", str(own)
    if case == "merge: --out holds the adapter":
        return (["merge", "--model", str(ckpt), "--adapter", str(trained / "adapter"), "--out", str(trained)],
                "exists and is not empty", str(trained))  # merge needs a new or empty --out: that check comes first
    if case == "merge: --out is the model":
        shutil.copytree(ckpt, box / "m")
        return (["merge", "--model", str(box / "m"), "--adapter", str(trained / "adapter"), "--out", str(box / "m")],
                "exists and is not empty", str(box / "m"))
    assert case == "init-model: --out is the tokenizer"
    shutil.copytree(ckpt, box / "m")
    return ["init-model", "--tokenizer", str(box / "m"), "--out", str(box / "m")], "exists and is not empty", str(box / "m")


@pytest.mark.parametrize("case", ["train: the base model of a full fine-tune", "train: --out is the model, through '..'",
                                  "train: the recipe", "train: the data, through a symlink",
                                  "train --resume: a file of the user's as the recipe", "merge: --out holds the adapter",
                                  "merge: --out is the model", "init-model: --out is the tokenizer"])
def test_an_output_that_is_or_holds_an_input_is_refused_and_nothing_changes(case, tmp_path, ckpt, data, trained,
                                                                            capsys):
    argv, relation, named = _inputs_case(case, tmp_path, ckpt, data, trained)
    before = _tree(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    line = one_line_error(capsys, argv[0], relation, "choose a")
    assert named in line
    if argv[0] == "train":
        assert "outputs are never written where an input is" in line
    assert _tree(tmp_path) == before


def test_overwrite_removes_only_what_loratune_wrote(tmp_path, ckpt, data, trained):
    (trained / "notes.txt").write_text("my notes on this run")
    (trained / "mine").mkdir()
    (trained / "mine" / "eval.json").write_text("{}")
    listed = json.loads((trained / MANIFEST_NAME).read_text())["outputs"]
    assert set(listed) == {"adapter", "checkpoints", "loss.png", "metrics.jsonl", "recipe.yaml", "samples.json"}
    old_adapter = (trained / "adapter" / "adapter_model.safetensors").read_bytes()
    recipe = str(recipe_file(tmp_path, ckpt, data, trained))
    assert main(["train", recipe, *TRAIN, "--overwrite", "--set", "seed=7", "--set", "max_steps=3"]) == 0
    assert (trained / "notes.txt").read_text() == "my notes on this run"
    assert (trained / "mine" / "eval.json").read_text() == "{}"
    assert (trained / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-000003"]
    assert not [p for p in trained.iterdir() if p.name.startswith(".trash-")]


def test_a_directory_from_before_the_manifest(tmp_path, ckpt, data, trained, capsys):
    """An older loratune's run (a complete checkpoint, no manifest): its standard outputs are taken as
    loratune's, anything else stays; a directory without a checkpoint is not taken for a run."""
    (trained / MANIFEST_NAME).unlink()
    (trained / "notes.txt").write_text("mine")
    recipe = str(recipe_file(tmp_path, ckpt, data, trained))
    assert main(["train", recipe, *TRAIN, "--overwrite", "--set", "max_steps=3"]) == 0
    assert (trained / "notes.txt").read_text() == "mine" and (trained / MANIFEST_NAME).is_file()
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-000003"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (other / "recipe.yaml").write_text("# my hand-written notes\n")
    before = _tree(other)
    capsys.readouterr()
    assert main(["train", str(recipe_file(tmp_path, ckpt, data, other)), *TRAIN, "--overwrite"]) == 2
    one_line_error(capsys, "train", "holds metrics.jsonl, recipe.yaml, which loratune did not write there")
    assert _tree(other) == before


def test_a_damaged_manifest_is_one_line_and_nothing_is_removed(tmp_path, ckpt, data, trained, capsys):
    (trained / MANIFEST_NAME).write_text('{"outputs": ["../../etc"]}')
    before = _tree(trained)
    capsys.readouterr()
    assert main(["train", str(recipe_file(tmp_path, ckpt, data, trained)), *TRAIN, "--overwrite"]) == 2
    one_line_error(capsys, "train", MANIFEST_NAME, "is not a loratune manifest")
    assert _tree(trained) == before


def test_a_failed_overwrite_leaves_one_runs_files_never_a_mix(tmp_path, ckpt, data, trained, capsys):
    """Refused at setup (empty data): the old run is untouched. Failing at step 1 (an Inf gradient):
    the old run's outputs are all gone, the new run's recipe, metrics and samples are there, and no
    adapter (the old one used to stay beside the new metrics)."""
    (trained / "notes.txt").write_text("mine")
    before = _tree(trained)
    recipe = str(recipe_file(tmp_path, ckpt, data, trained))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    capsys.readouterr()
    assert main(["train", recipe, *TRAIN, "--overwrite", "--data", str(empty)]) == 2
    one_line_error(capsys, "train", "empty")
    assert _tree(trained) == before

    assert main(["train", recipe, *TRAIN, "--overwrite", "--set", "lora.alpha=1e30"]) == 2
    one_line_error(capsys, "train", "at step 1")
    assert sorted(p.name for p in trained.iterdir()) == sorted(
        [MANIFEST_NAME, "metrics.jsonl", "notes.txt", "recipe.yaml", "samples.json"])
    assert "alpha: 1.0e+30" in (trained / "recipe.yaml").read_text()
    assert [r.get("error") for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines())][-1] \
        .startswith("non-finite")
    assert (trained / "notes.txt").read_text() == "mine"
    assert main(["train", recipe, *TRAIN, "--overwrite"]) == 0  # and the next --overwrite starts clean
    assert (trained / "adapter").is_dir() and (trained / "notes.txt").read_text() == "mine"
