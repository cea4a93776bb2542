"""``torchrun --nproc-per-node 2 -m loratune train`` on CPU (gloo), for real: DDP equals one process, FSDP2
trains LoRA and full fine-tuning, saves, resumes after a kill on 2 processes and on 1, and its adapter loads
in PEFT; a killed rank stops the others with a clear error in bounded time, and Ctrl-C stops every rank at
the same step with a checkpoint. Each launch binds to 127.0.0.1 on a free port and is bounded in time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import free_port
from family_models import write_decoder, write_small_tokenizer
from loratune.recipe import load_recipe
from loratune.train import train
from loratune.train.checkpoint import list_checkpoints
from loratune.train.metrics import read_metrics

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="this torch build has no gloo backend"),
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")]

LAUNCH_TIMEOUT = 240  # seconds a launch may take before the test fails (each takes ~10 s here)
TOL = 1e-5
SETTINGS = ["data.text_field=text", "seq_len=24", "batch_size=8", "grad_accum=4", "max_steps=4", "lr=2e-2",
            "lora.dropout=0", "log_every=1", "eval_every=2", "save_every=2", "eval_batches=null",
            "data.val_fraction=0.1", "sample_tokens=3", "sample_prompt=the red cat", "precision=fp32",
            "device=cpu"]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama-family checkpoint (real tokenizer.json) and a sentence data set."""
    root = tmp_path_factory.mktemp("torchrun")
    model = write_decoder("llama", root / "llama", vocab_size=320)
    write_small_tokenizer(model)
    rng = random.Random(0)
    with (root / "data.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(160):
            c, a = rng.choice(["red", "blue", "green"]), rng.choice(["cat", "dog", "fox", "bird"])
            f.write(json.dumps({"text": f"the {c} {a} runs to the park and sleeps in the house."}) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {model}\ndata:\n  source: {root / 'data.jsonl'}\n", encoding="utf-8")
    return {"root": root, "model": model, "recipe": recipe}


def _command(job: dict, out: Path, nproc: int, settings: list[str], *extra: str) -> list[str]:
    sets = [a for s in settings for a in ("--set", s)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "loratune", "train", str(job["recipe"]), "--out", str(out),
            "--no-progress", *sets, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LORATUNE_DIST_TIMEOUT": "60"}


def launch(job: dict, out: Path, nproc: int, settings: list[str], *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(job, out, nproc, settings, *extra), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(job: dict, out: Path, nproc: int, settings: list[str]) -> subprocess.Popen:
    """A long launch in its own process group (so the test can stop all of it)."""
    return subprocess.Popen(_command(job, out, nproc, settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), start_new_session=True)


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, step: int, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(p.name.split("-")[1]) >= step for p in list_checkpoints(out / "checkpoints")):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    kill_launch(proc)
    pytest.fail(f"no checkpoint at step {step} within {timeout} s")


def in_process(job: dict, out: Path, settings: list[str], resume: bool = False):
    recipe = load_recipe(str(job["recipe"]), [*settings, f"out_dir={out}"])
    return train(recipe, resume=resume, progress=False)


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert float((x[k] - y[k]).abs().max()) <= TOL, k


ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process(job, tmp_path):
    """Batches of 8 in micro-batches of 2: each rank takes 4 rows as 2 micro-batches and all-reduces once."""
    in_process(job, tmp_path / "one", SETTINGS)
    done = launch(job, tmp_path / "ddp", 2, SETTINGS)
    assert_same_tensors(tmp_path / "one" / ADAPTER, tmp_path / "ddp" / ADAPTER)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert len(one) == len(two)  # rank 0 alone writes
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(a[key])), (key, a, b)
    assert done.stdout.count("done:") == 1  # rank 0 alone prints the summary
    ckpt = list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1]
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_fsdp_lora_resumes_after_a_kill_on_two_processes_and_on_one(job, tmp_path):
    """Batches of 7 (one made-up row on rank 1), a kill of the whole launch mid-run, resumed on 2 processes
    (FSDP2) and in one process: both equal an uninterrupted run; the adapter loads in PEFT."""
    settings = [*SETTINGS, "strategy=fsdp", "batch_size=7", "grad_accum=1", "save_every=5", "max_steps=100000",
                "eval_every=0", "sample_tokens=0"]
    proc = start(job, tmp_path / "killed", 2, settings)
    wait_for_checkpoint(tmp_path / "killed", proc, 10)
    kill_launch(proc)
    last = int(list_checkpoints(tmp_path / "killed" / "checkpoints")[-1].name.split("-")[1])
    end = [f"max_steps={last + 3}"]
    shutil.copytree(tmp_path / "killed", tmp_path / "on-one")
    launch(job, tmp_path / "killed", 2, settings + end, "--resume")
    in_process(job, tmp_path / "on-one", settings + end, resume=True)
    in_process(job, tmp_path / "straight", settings + end)
    assert_same_tensors(tmp_path / "straight" / ADAPTER, tmp_path / "killed" / ADAPTER)
    assert_same_tensors(tmp_path / "straight" / ADAPTER, tmp_path / "on-one" / ADAPTER)
    _assert_peft_matches(job["model"], tmp_path / "killed" / "adapter")


def _assert_peft_matches(model_dir: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratune.adapters.peft_format import load_adapter
    from loratune.models import load_model

    ours, _ = load_model(model_dir)
    load_adapter(ours, adapter)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = peft(x).logits, ours(x)
        with peft.disable_adapter():
            assert float((theirs - peft(x).logits).abs().max()) > 1e-3  # the trained adapter changes them
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resume_on_the_same_world_restores_each_ranks_rng_and_ddp_resumes_as_fsdp(job, tmp_path):
    """With LoRA dropout: a DDP run stopped at a checkpoint and resumed on 2 processes is bit-identical to the
    uninterrupted run (each rank's generator restored); resumed with FSDP2 instead it is equal within 1e-5."""
    settings = [*SETTINGS, "lora.dropout=0.1", "max_steps=6", "save_every=3", "eval_every=0", "sample_tokens=0"]
    launch(job, tmp_path / "straight", 2, settings)
    for name in ("again", "as-fsdp"):
        shutil.copytree(tmp_path / "straight", tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-000006")
        shutil.rmtree(tmp_path / name / "adapter")
    launch(job, tmp_path / "again", 2, settings, "--resume")
    launch(job, tmp_path / "as-fsdp", 2, [*settings, "strategy=fsdp"], "--resume")
    straight = load_file(str(tmp_path / "straight" / ADAPTER))
    again = load_file(str(tmp_path / "again" / ADAPTER))
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert_same_tensors(tmp_path / "straight" / ADAPTER, tmp_path / "as-fsdp" / ADAPTER)
    one = tmp_path / "one"  # and dropout is on: one process (its own masks) ends elsewhere
    in_process(job, one, settings)
    alone = load_file(str(one / ADAPTER))
    assert max(float((straight[k] - alone[k]).abs().max()) for k in straight) > TOL


@pytest.mark.slow
def test_fsdp_full_finetuning_equals_one_process_resumes_and_loads_in_transformers(job, tmp_path):
    from transformers import AutoModelForCausalLM

    settings = [*SETTINGS, "finetune=full", "lr=1e-3", "strategy=fsdp", "max_steps=3", "save_every=2"]
    in_process(job, tmp_path / "one", settings)
    launch(job, tmp_path / "fsdp", 2, settings)
    assert_same_tensors(tmp_path / "one" / "model" / "model.safetensors",
                        tmp_path / "fsdp" / "model" / "model.safetensors")
    for name in ("resumed-on-2", "resumed-on-1"):  # the whole model's shards resume, on 2 processes and on 1
        shutil.copytree(tmp_path / "fsdp", tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-000003")
        shutil.rmtree(tmp_path / name / "model")
    launch(job, tmp_path / "resumed-on-2", 2, settings, "--resume")
    in_process(job, tmp_path / "resumed-on-1", settings, resume=True)
    for name in ("resumed-on-2", "resumed-on-1"):
        assert_same_tensors(tmp_path / "one" / "model" / "model.safetensors",
                            tmp_path / name / "model" / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    base = AutoModelForCausalLM.from_pretrained(job["model"])
    x = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the trained weights were loaded, and they differ from the base's
        assert float((loaded(x).logits - base(x).logits).abs().max()) > 1e-3


def workers(proc: subprocess.Popen) -> dict[int, int]:
    """The launch's workers (torchrun's children, each in its own session), by rank: {rank: pid}."""
    found = {}
    for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            parent = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=") and v[5:].isdigit()]
        if parent == proc.pid and ranks:
            found[ranks[0]] = pid
    return found


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker at once (a node going down): nothing gets to save."""
    ranks = workers(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)


@pytest.mark.slow
def test_a_killed_rank_stops_the_others_with_a_clear_error(job, tmp_path):
    settings = [*SETTINGS, "max_steps=100000", "save_every=5", "eval_every=0", "sample_tokens=0"]
    out = tmp_path / "run"
    proc = start(job, out, 2, settings)
    wait_for_checkpoint(out, proc, 10)
    os.kill(workers(proc)[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=90)
    assert time.monotonic() - killed < 60
    assert proc.returncode != 0
    assert "loratune train [rank 0]: error: rank 0 of 2: lost contact with the other ranks" in stderr, stderr[-3000:]
    last = int(list_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    result = in_process(job, out, [*settings, f"max_steps={last + 2}"], resume=True)
    assert result.status == "done" and result.steps == last + 2


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint(job, tmp_path):
    settings = [*SETTINGS, "max_steps=100000", "save_every=5", "eval_every=0", "sample_tokens=0"]
    out = tmp_path / "run"
    proc = start(job, out, 2, settings)
    wait_for_checkpoint(out, proc, 5)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the whole launch
    _, stderr = proc.communicate(timeout=90)
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1, stderr[-3000:]  # rank 0 says it
    step = int(stopped[0].split()[3].rstrip(";"))
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step-{step:06d}"
    launch(job, out, 2, [*settings, f"max_steps={step + 2}"], "--resume")
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == step + 2
