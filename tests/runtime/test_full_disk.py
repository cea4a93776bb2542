"""A real full disk: a 2 MB tmpfs mounted for the test (root only; skipped where mount is not permitted).

What the writers really raise there is not an ``OSError``: safetensors raises
``SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")``
and ``torch.save`` a ``RuntimeError`` ("unexpected pos ..."). These tests check that every place
that writes weights turns that into the ResourceError with advice (exit 2 through the CLI), and
that nothing half-written stays: no ``.tmp-`` directory, no half model directory, the earlier
checkpoints byte-identical. ``tests/train/test_guards.py`` keeps the injected-ENOSPC tests, which
reach the same code without needing root.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratune.cli import main
from loratune.errors import ResourceError
from loratune.runtime.fsutil import atomic_dir, write_os_error
from loratune.train.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint

SIZE = "2m"


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 2 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int) -> None:
    """Take all of ``disk``'s free space but ``leave`` bytes (a file named filler)."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    assert abs(shutil.disk_usage(disk).free - leave) <= 8192


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [x for x in err.splitlines() if x.startswith(f"loratune {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_real_writers_errors_are_found_to_be_a_full_disk(small_disk):
    fill(small_disk, 64 * 1024)
    with pytest.raises(OSError) as info:  # the safetensors writer, through atomic_dir
        with atomic_dir(small_disk / "out") as tmp:
            save_file({"w": torch.zeros(256 * 1024)}, str(tmp / "w.safetensors"))
    assert info.value.errno == errno.ENOSPC and type(info.value.__cause__).__name__ == "SafetensorError"
    with pytest.raises(RuntimeError) as info:  # torch.save into a file object: the OSError is its context
        with open(small_disk / "x.pt", "wb") as f:
            torch.save({"w": torch.zeros(256 * 1024)}, f)
    assert write_os_error(info.value).errno == errno.ENOSPC
    os.unlink(small_disk / "x.pt")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_checkpoint_on_a_full_disk_is_a_resource_error_and_keeps_the_last_one(small_disk, writer):
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # 256 KiB of weights: optimizer.pt is about twice that
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    root = small_disk / "checkpoints"
    save_checkpoint(root, model, optimizer, scheduler, TrainState(step=1), keep=2)
    before = tree(root)
    fill(small_disk, 128 * 1024 if writer == "safetensors" else 384 * 1024)  # the weights fit, the optimizer not
    with pytest.raises(ResourceError) as info:
        save_checkpoint(root, model, optimizer, scheduler, TrainState(step=2), keep=2)
    message = str(info.value)
    assert message.startswith(f"no space left on the device while writing checkpoint {root / 'step-000002'} "
                              "(No space left on device)"), message
    assert f"the last complete checkpoint is {root / 'step-000001'}" in message and "--resume" in message
    assert tree(root) == before and [p.name for p in root.iterdir()] == ["step-000001"]
    assert load_checkpoint(root / "step-000001", model, optimizer, scheduler).step == 1


def test_init_model_on_a_full_disk_leaves_no_directory(small_disk, capsys):
    out = small_disk / "model"  # the tiny preset is about 13 MB
    assert main(["init-model", "--out", str(out)]) == 2
    line = one_error_line(capsys, "init-model")
    assert f"no space left on the device while writing the model to {out}" in line and "Free some space" in line
    assert sorted(p.name for p in small_disk.iterdir()) == []  # no half directory, no temporary one


def test_merge_on_a_full_disk_is_a_resource_error_and_leaves_nothing(small_disk, tmp_path, ckpt, capsys):
    from loratune.adapters.lora import LoRAConfig
    from loratune.adapters.peft_format import save_adapter
    from loratune.adapters.targets import inject_lora
    from loratune.models import load_model

    model, _ = load_model(ckpt)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "v"]))
    save_adapter(model, tmp_path / "adapter", LoRAConfig(r=4, alpha=8, targets=["q", "v"]), base_model=str(ckpt))
    out = small_disk / "merged"
    assert main(["merge", "--model", str(ckpt), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    line = one_error_line(capsys, "merge")
    assert f"no space left on the device while writing the merged model to {out}" in line, line
    assert sorted(p.name for p in small_disk.iterdir()) == []


def test_train_on_a_disk_that_fills_up_stops_with_advice_and_resumes(small_disk, tmp_path, ckpt, capsys,
                                                                      monkeypatch):
    """The run's start-up check sees room (as it would before another program filled the disk); then
    the real writers meet the full tmpfs. After space is freed, --resume finishes the run."""
    import json

    import loratune.train.guards

    monkeypatch.setattr(loratune.train.guards, "free_disk", lambda path: 10**12)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat."}) + "\n" for i in range(24)))
    out = small_disk / "run"
    argv = ["train", "--set", f"model={ckpt}", "--set", f"data.source={data}", "--set", "data.text_field=text",
            "--out", str(out), "--set", "seq_len=16", "--set", "batch_size=4", "--set", "max_steps=6",
            "--set", "save_every=3", "--set", "sample_tokens=0", "--set", "eval_every=0", "--set", "precision=fp32",
            "--no-progress"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 0\n")
    argv.insert(1, str(recipe))
    fill(small_disk, 100 * 1024)
    assert main(argv) == 2
    line = one_error_line(capsys, "train")
    print("\nTRAIN FULL DISK |", line)
    assert "no space left on the device while writing" in line and "--resume" in line, line
    assert not [p for p in out.rglob(".tmp-*")], "an unfinished write was left"
    for path in list_checkpoints(out / "checkpoints"):
        assert (path / "state.json").is_file()
    (small_disk / "filler").unlink()  # space freed
    again = [*argv, "--resume"] if list_checkpoints(out / "checkpoints") else [*argv, "--overwrite"]
    assert main(again) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
