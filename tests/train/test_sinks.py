"""loratune/train/sinks.py: report_to writes the same metrics as metrics.jsonl to TensorBoard, W&B (offline)
and MLflow (file store), under the run's directory, each read back with its own reader; a resume appends
and never repeats a step; a sink whose package is missing is refused, naming the pip extra, before
anything is written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from loratune.errors import ConfigError
from loratune.train import sinks as sinks_module
from loratune.train import train
from loratune.train.metrics import read_metrics

from test_train import make_recipe, write_sentences

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

ALL = "report_to=[jsonl, tensorboard, wandb, mlflow]"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_sentences(tmp_path_factory.mktemp("data") / "sentences.jsonl")


@pytest.fixture(autouse=True)
def wandb_here(tmp_path, monkeypatch):
    """W&B offline, with its settings and caches under the test's directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


# --- the readers ---------------------------------------------------------------------------------

def tensorboard_scalars(directory: Path, key: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    events = acc.Scalars(key)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{key}: a step twice in {steps}"
    return {e.step: e.value for e in events}


def wandb_records(path: Path):
    """The records of an offline run's .wandb file (a LevelDB-style log: 32 KiB blocks of chunks with a
    7-byte header, after the file's 7-byte ':W&B' header)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            yield chunk
            chunk = b""


def wandb_history(out: Path, key: str) -> dict[int, float]:
    from wandb.proto import wandb_internal_pb2

    found: list[tuple[int, float]] = []
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {out / 'wandb'}"
    for path in files:
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if key in items:
                found.append((items["_step"], items[key]))
    steps = [s for s, _ in found]
    assert len(steps) == len(set(steps)), f"{key}: a step twice in {steps}"
    return dict(found)


def mlflow_history(out: Path, key: str) -> dict[int, float]:
    client = sinks_module.mlflow_client(out / "mlruns")
    (experiment,) = [e for e in client.search_experiments() if e.name == "loratune"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"{key}: a step twice in {steps}"
    return {m.step: m.value for m in history}


def jsonl(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if key in r}


def assert_every_sink_matches(out: Path) -> None:
    for key in ("loss", "val_loss", "grad_norm", "lr"):
        expected = jsonl(out, key)
        assert expected, key
        tb = tensorboard_scalars(out / "tensorboard", key)
        assert tb.keys() == expected.keys() and all(abs(tb[s] - v) <= 1e-6 * max(1, abs(v))  # float32 events
                                                    for s, v in expected.items()), (key, tb, expected)
        assert wandb_history(out, key) == pytest.approx(expected, rel=1e-12), key
        assert mlflow_history(out, key) == pytest.approx(expected, rel=1e-12), key


# --- the tests -------------------------------------------------------------------------------------

def test_every_sink_holds_the_losses_of_metrics_jsonl(ckpt, data_file, tmp_path):
    out = tmp_path / "run"
    result = train(make_recipe(ckpt, data_file, out, ALL, "eval_every=2"), progress=False)
    assert result.status == "done"
    assert_every_sink_matches(out)
    manifest = json.loads((out / ".loratune-manifest.json").read_text())
    listed = json.dumps(manifest)
    assert all(name in listed for name in ("tensorboard", "wandb", "mlruns"))


def test_a_resume_appends_and_never_repeats_a_step(ckpt, data_file, tmp_path):
    """A run that went past its last checkpoint (steps 5 and 6 logged, step 6's checkpoint lost) resumes
    from step 4: every sink then holds steps 1..8 once each, with metrics.jsonl's values (resume is exact)."""
    out = tmp_path / "run"
    settings = [ALL, "save_every=2", "keep_checkpoints=3", "eval_every=2"]
    assert train(make_recipe(ckpt, data_file, out, *settings, "max_steps=6"), progress=False).status == "done"
    shutil.rmtree(out / "checkpoints" / "step-000006")
    resumed = train(make_recipe(ckpt, data_file, out, *settings, "max_steps=8"), resume=True, progress=False)
    assert resumed.status == "done" and resumed.steps == 8
    assert sorted(jsonl(out, "loss")) == list(range(1, 9))
    assert_every_sink_matches(out)


def test_a_sink_whose_package_is_missing_is_refused_naming_the_extra(ckpt, data_file, tmp_path, monkeypatch):
    real = sinks_module.importlib.util.find_spec
    monkeypatch.setattr(sinks_module.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the wandb package: pip install 'loratune\[wandb\]'"):
        train(make_recipe(ckpt, data_file, out, "report_to=[tensorboard, wandb]"), progress=False)
    assert not out.exists()


def test_an_unknown_sink_is_refused(ckpt, data_file, tmp_path):
    with pytest.raises(ConfigError, match="report_to: unknown sink 'comet'; known: jsonl, tensorboard, wandb, mlflow"):
        train(make_recipe(ckpt, data_file, tmp_path / "run", "report_to=[comet]"), progress=False)
    assert not (tmp_path / "run").exists()


def test_only_metrics_jsonl_by_default(ckpt, data_file, tmp_path):
    out = tmp_path / "run"
    train(make_recipe(ckpt, data_file, out), progress=False)
    assert not any((out / name).exists() for name in ("tensorboard", "wandb", "mlruns"))
    assert jsonl(out, "loss")
