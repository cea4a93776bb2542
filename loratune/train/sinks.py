"""Where a run's metrics go (the recipe's ``report_to``): metrics.jsonl always, plus TensorBoard,
Weights & Biases and MLflow, each writing under the run's output directory by default.

- ``jsonl``: ``OUT/metrics.jsonl`` (:class:`~loratune.train.metrics.MetricsLog`), always written:
  ``loss.png``, the resume rules and the tests read it. Naming it in ``report_to`` is allowed.
- ``tensorboard``: event files in ``OUT/tensorboard`` (``pip install 'loratune[tensorboard]'``);
  ``tensorboard --logdir OUT/tensorboard``.
- ``wandb``: a Weights & Biases run in ``OUT/wandb`` (``pip install 'loratune[wandb]'``), offline
  unless ``WANDB_MODE`` says otherwise (``wandb sync OUT/wandb/offline-run-*`` uploads it later);
  project ``WANDB_PROJECT`` or ``loratune``.
- ``mlflow``: an MLflow file store in ``OUT/mlruns`` (``pip install 'loratune[mlflow]'``:
  mlflow-skinny), experiment ``MLFLOW_EXPERIMENT_NAME`` or ``loratune``; MLflow 3 keeps its file
  store behind ``MLFLOW_ALLOW_FILE_STORE=true`` (``MLFLOW_ALLOW_FILE_STORE=true mlflow ui
  --backend-store-uri OUT/mlruns``).

Every sink gets the same records as metrics.jsonl (its numeric fields, at the record's ``step``),
on rank 0 only. A resumed run appends and never repeats a step: metrics.jsonl drops the lines past
the checkpoint, TensorBoard purges them (``purge_step``), and W&B and MLflow continue the same run
(its id kept in ``OUT/<dir>/loratune-run.json``) and skip the records the stopped run had already
sent (resume is exact, so they hold the same values).

Adding a sink: subclass :class:`MetricSink` (``name``, ``extra``, ``modules``, ``__init__``,
``write``, ``close``), register it in :data:`SINKS`, add its pip extra to pyproject.toml, and add
its directory name to ``run_dir.RUN_OUTPUTS`` so the manifest lists it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
from .metrics import MetricsLog

PROJECT = "loratune"
"""The W&B project and MLflow experiment when the environment names none."""


class MetricSink:
    """One destination of the run's metric records; see the module docstring."""

    name: ClassVar[str]
    """The ``report_to`` value."""
    extra: ClassVar[str | None] = None
    """The pip extra that installs it (``loratune[<extra>]``)."""
    modules: ClassVar[tuple[str, ...]] = ()
    """The modules it needs (checked before the run starts)."""
    directory: ClassVar[str | None] = None
    """What it writes under the output directory (listed in the run's manifest)."""

    def __init__(self, out: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        """Open the sink for the run in ``out`` (``resume_step``: the checkpoint's step on resume, else None)."""

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and finish (also after a stop or an error)."""


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields but ``step`` (what the external sinks log)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink(MetricSink):
    name, extra, modules, directory = "tensorboard", "tensorboard", ("tensorboard",), "tensorboard"

    def __init__(self, out: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop what an earlier process wrote from that step on (a stopped run's last steps)
        self.writer = SummaryWriter(str(out / self.directory),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("recipe", "```yaml\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in numeric(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _ResumableRun(MetricSink):
    """A sink whose run continues on resume: the run id and the last step sent live in
    ``OUT/<directory>/loratune-run.json``, so a resumed run skips what was already sent."""

    def _open_marker(self, out: Path, resume_step: int | None) -> dict[str, Any]:
        self.marker = out / self.directory / "loratune-run.json"
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        state = {}
        if resume_step is not None and self.marker.is_file():
            try:
                state = json.loads(self.marker.read_text(encoding="utf-8"))
            except ValueError:
                state = {}
        self.sent_step, self.sent_keys = state.get("step", -1), set(state.get("keys", ()))
        return state

    def _fresh(self, record: dict[str, Any], values: dict[str, float]) -> dict[str, float]:
        """What of ``record`` this run has not sent yet."""
        step = record["step"]
        if step < self.sent_step:
            return {}
        if step == self.sent_step:
            return {k: v for k, v in values.items() if k not in self.sent_keys}
        return values

    def _sent(self, step: int, keys) -> None:
        self.sent_keys = (self.sent_keys if step == self.sent_step else set()) | set(keys)
        self.sent_step = step
        tmp = self.marker.with_name(f".{self.marker.name}.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "step": step, "keys": sorted(self.sent_keys)}),
                       encoding="utf-8")
        os.replace(tmp, self.marker)


class WandbSink(_ResumableRun):
    name, extra, modules, directory = "wandb", "wandb", ("wandb",), "wandb"

    def __init__(self, out: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        state = self._open_marker(out, resume_step)
        self.run_id = state.get("run_id") or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, id=self.run_id,
                              resume="allow", dir=str(out), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(console="off", silent=True))
        self._sent(self.sent_step, self.sent_keys)  # the id, before the first record

    def write(self, record: dict[str, Any]) -> None:
        values = self._fresh(record, numeric(record))
        if values:
            self.run.log(values, step=record["step"])
            self._sent(record["step"], values)

    def close(self) -> None:
        self.run.finish()


class MLflowSink(_ResumableRun):
    name, extra, modules, directory = "mlflow", "mlflow", ("mlflow",), "mlruns"

    def __init__(self, out: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        from mlflow.entities import Metric, Param

        self._metric = Metric
        state = self._open_marker(out, resume_step)
        self.client = mlflow_client(out / self.directory)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = state.get("run_id")
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in _flat(config).items()]
            for start in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self._sent(self.sent_step, self.sent_keys)

    def write(self, record: dict[str, Any]) -> None:
        values = self._fresh(record, numeric(record))
        if values:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, record["step"])
                                                        for k, v in values.items()])
            self._sent(record["step"], values)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_client(store: Path):
    """An MlflowClient on the file store ``store`` (MLflow 3 refuses file stores unless
    MLFLOW_ALLOW_FILE_STORE is set: set here for this client only)."""
    from mlflow.tracking import MlflowClient

    previous = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = MlflowClient(tracking_uri=Path(store).resolve().as_uri())
        client._tracking_client.store  # the store is made (and the variable read) on first use
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = previous
    return client


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


SINKS: dict[str, type[MetricSink] | None] = {"jsonl": None, "tensorboard": TensorBoardSink, "wandb": WandbSink,
                                             "mlflow": MLflowSink}
"""Sinks by ``report_to`` name (``jsonl``, always on, is the run's MetricsLog)."""


SINK_DIRECTORIES = tuple(sink.directory for sink in SINKS.values() if sink is not None and sink.directory)
"""Every directory a sink may write under the output directory."""


def check_report_to(names: list[str]) -> None:
    """Refuse unknown sink names, and sinks whose package is not installed (naming the pip extra),
    before the run changes anything."""
    for name in names:
        if name not in SINKS:
            raise ConfigError(f"report_to: unknown sink {name!r}; known: {', '.join(SINKS)}")
        sink = SINKS[name]
        missing = [m for m in (sink.modules if sink else ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"report_to: {name} needs the {', '.join(missing)} package: "
                              f"pip install 'loratune[{sink.extra}]' (or remove {name} from report_to)")


def sink_directories(names: list[str]) -> list[str]:
    """What the named sinks write under the output directory."""
    return list(dict.fromkeys(SINKS[n].directory for n in names if SINKS.get(n) is not None and SINKS[n].directory))


class MetricSinks:
    """The run's sinks as one: metrics.jsonl (``jsonl``, a MetricsLog) and the external ones, written
    together; nothing on the ranks of a launch other than rank 0 (``enabled`` False)."""

    def __init__(self, out: Path, report_to: list[str], run_name: str, config: dict[str, Any],
                 resume_step: int | None, enabled: bool = True) -> None:
        self.jsonl = MetricsLog(out / "metrics.jsonl", resume_step=resume_step, enabled=enabled)
        self.external: list[MetricSink] = []
        if enabled:
            check_report_to(report_to)
            try:
                for name in dict.fromkeys(report_to):
                    if SINKS[name] is not None:
                        self.external.append(SINKS[name](out, run_name, config, resume_step))
            except BaseException:
                self.close()
                raise

    @property
    def enabled(self) -> bool:
        return self.jsonl.enabled

    @property
    def path(self) -> Path:
        return self.jsonl.path

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        for sink in self.external:
            sink.write(record)

    def close(self) -> None:
        for sink in self.external:
            sink.close()
        self.external = []
