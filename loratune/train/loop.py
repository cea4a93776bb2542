"""One training loop for LoRA and full fine-tuning: which parameters train is the only difference.

``train(recipe)`` sets up a :class:`~loratune.train.session.TrainingSession` (model, objective,
AdamW with warm-up and decay, precision, data), steps it, evaluates, checkpoints (resumable
bit-for-bit), and writes the adapter, the metrics (``metrics.jsonl`` and the recipe's
``report_to`` sinks, see ``sinks.py``), ``loss.png``, ``samples.json`` and the resolved recipe.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dist.world import SINGLE, World, agree, rank_failures
from ..models.compile import compile_report
from ..recipe import Recipe, recipe_dict
from .checkpoint import list_checkpoints
from .guards import disk_error
from .metrics import Throughput, human_bytes, peak_memory_bytes, perplexity, plot_losses, read_metrics
from .objective import make_objective
from .run_dir import claim_run_dir, open_run_dir, refuse_going_back
from .samples import read_samples
from .session import TrainingSession, resolve_device, setup_model
from .sinks import MetricSinks, check_report_to
from .step import NonFiniteStep, StepResult, TrainingStopped
from .stop import StopRequest

log = logging.getLogger("loratune")

__all__ = ["TrainResult", "resolve_device", "setup_model", "train"]


@dataclass
class TrainResult:
    """What a run did, for the CLI summary and for tests."""

    out_dir: Path
    steps: int
    status: str  # done | interrupted
    train_loss: float | None
    val_loss: float | None
    seconds: float
    peak_memory: int
    trainable: int
    total: int


@dataclass
class _Run:
    """A session training in an output directory, with its metric sinks and samples."""

    session: TrainingSession
    out: Path
    metrics: MetricSinks
    samples: dict

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def train(recipe: Recipe, resume: bool = False, progress: bool = True, force_resume: bool = False,
          overwrite: bool = False, world: World = SINGLE, recipe_file: str | Path | None = None) -> TrainResult:
    """Run the recipe; see the module docstring. Raises TrainingStopped on a NaN loss.

    The output directory must be new or empty unless ``resume`` (continue the run there) or
    ``overwrite`` (start over: what loratune wrote there is removed once the new run is set up; see
    ``run_dir.py``), and never is or holds an input (the model, the data, ``recipe_file``). The run
    holds a lock there while it runs. ``force_resume`` continues from a checkpoint even when the
    recipe's result-changing fields differ from the ones the checkpoint was made with. Nothing
    in the directory changes before the recipe, model, data and resources have been checked.

    Under torchrun every rank calls this with its ``world``: rank 0 prepares the directory, holds
    the lock, writes every output and is the only one writing to the metric sinks; all ranks train,
    evaluate, sample and checkpoint together.
    """
    make_objective(recipe.objective, recipe)  # an unknown objective or a sink that is not installed: refused first
    check_report_to(recipe.report_to)
    recipe, _ = resolve_device(recipe, world)
    torch.manual_seed(recipe.seed)
    out = Path(recipe.out_dir).expanduser()
    with contextlib.ExitStack() as held, rank_failures(world):
        owned = agree(world, lambda: claim_run_dir(out, recipe, recipe_file, resume, overwrite, held),
                      "preparing the output directory", main_only=True)
        run = _start(recipe, out, resume, force_resume, world,
                     functools.partial(open_run_dir, out, recipe, owned, overwrite and not resume))
        held.callback(run.metrics.close)
        run.samples = read_samples(out / "samples.json", recipe.sample_prompt) if resume else _first_sample(run)
        start_time = time.perf_counter()
        status, last = _loop(run, progress and world.main)
        elapsed = time.perf_counter() - start_time
        path = run.session.save(run.ckpt_root)
        if status == "interrupted":
            log.info(f"stopped at step {run.session.state.step}; checkpoint {path}. "
                     "Continue with: loratune train ... --resume")
            return _result(run, status, last, None, elapsed)
        return _finish(run, path, last, elapsed)


def _start(recipe: Recipe, out: Path, resume: bool, force_resume: bool, world: World, open_dir) -> _Run:
    """The session and (on resume) the last checkpoint's state; then (rank 0) ``open_dir``: the first
    change to the output directory, once all of that is known to be good; then the metric sinks."""
    session = TrainingSession.from_recipe(recipe, world=world, out_dir=out)
    if resume:
        found = session.resume(out / "checkpoints", force=force_resume)
        refuse_going_back(out, session.state.step, session.total_steps, found)
        log.info(f"resumed from {found} (step {session.state.step})")
    agree(world, open_dir, "writing the run's first files", main_only=True)
    metrics = agree(world, lambda: MetricSinks(out, recipe.report_to, out.name, recipe_dict(recipe),
                                               session.state.step if resume else None, enabled=world.main),
                    "opening the metric sinks")
    return _Run(session, out, metrics, {})


def _first_sample(run: _Run) -> dict:
    """The sample before training (and the validation curve's starting point), written when the run starts."""
    session, recipe = run.session, run.session.recipe
    samples = {"prompt": recipe.sample_prompt, "before": session.sample()}
    if session.world.main:
        (run.out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
    log.info(f"sample before training: {samples['before']!r}")
    if session.data.val_batches and recipe.eval_every:
        _write_val(run.metrics, 0, session.evaluate(), session.eval_metrics)
    return samples


def _loop(run: _Run, progress: bool) -> tuple[str, StepResult | None]:
    """Steps until the end or a stop request; returns ('done' | 'interrupted', the last step)."""
    session = run.session
    meter = Throughput()
    last = None
    bar = _progress_bar(session.total_steps, session.state.step, progress)
    stopping = False
    with StopRequest() as stop:
        while session.state.step < session.total_steps:
            try:
                last = session.step()
            except NonFiniteStep as exc:
                raise _stopped(run, session.state.step + 1, exc) from None
            meter.add(last.tokens)
            _after_step(run, last, meter, bar)
            if session.world.any(stop.requested):  # every rank stops at the same step
                stopping = True
                break
    if bar is not None:
        bar.close()
    return ("interrupted" if stopping else "done"), last


def _stopped(run: _Run, step: int, exc: NonFiniteStep) -> TrainingStopped:
    good = list_checkpoints(run.ckpt_root)
    run.metrics.write({"step": step, "error": f"non-finite {exc.what}"})
    return TrainingStopped(
        f"{exc.what} became {exc.value} at step {step}; stopping. Last good checkpoint: "
        f"{good[-1] if good else 'none'}. Try a lower lr or weight_decay, bf16-mixed instead of bf16-true, or check "
        "the data; resume with --resume")


def _after_step(run: _Run, result: StepResult, meter: Throughput, bar) -> None:
    """Metrics, periodic evaluation, the progress bar and periodic checkpoints after a step."""
    session = run.session
    recipe, step, total = session.recipe, session.state.step, session.total_steps
    lr = session.scheduler.get_last_lr()[0]
    if recipe.log_every and (step % recipe.log_every == 0 or step == total):
        run.metrics.write({"step": step, "loss": round(result.loss, 6), "lr": lr,
                           "tokens_per_s": round(meter.window_rate(), 1), "elapsed_s": round(meter.elapsed(), 2),
                           "grad_norm": round(result.grad_norm, 6), **_rounded_all(result.metrics)})
    if (compiled := compile_report(session.model)) is not None:  # compile: true, after a step that compiled
        run.metrics.write({"step": step, **compiled})
    if session.data.val_batches and recipe.eval_every and step % recipe.eval_every == 0 and step < total:
        _write_val(run.metrics, step, session.evaluate(), session.eval_metrics)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{meter.rate():.0f}")
    if recipe.save_every and step % recipe.save_every == 0 and step < total:
        session.save(run.ckpt_root)


def _finish(run: _Run, path: Path, last: StepResult | None, elapsed: float) -> TrainResult:
    """Final validation, the result (adapter or model), the loss plot and the sample after training."""
    session, out = run.session, run.out
    recipe = session.recipe
    val_loss = None
    if session.data.val_batches:
        val_loss = session.evaluate()
        if not _val_logged(run.metrics, session.state.step):  # a resume of a finished run has its line already
            _write_val(run.metrics, session.state.step, val_loss, session.eval_metrics)
    run.samples["after"] = session.sample()
    try:  # the last collective: what follows is rank 0's alone
        session.save_result(out)
    except OSError as exc:
        raise disk_error(exc, f"the result in {out}", f"checkpoint {path} holds the trained weights") from None
    if session.world.main:
        plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{recipe.finetune} fine-tuning of {recipe.model}",
                    **({} if recipe.objective == "sft" else {"ylabel": f"{recipe.objective} loss"}))
        (out / "samples.json").write_text(json.dumps(run.samples, indent=2) + "\n", encoding="utf-8")
    result = _result(run, "done", last, val_loss, elapsed)
    log.info(f"sample after training: {run.samples['after']!r}")
    log.info(f"done: {result.steps} steps in {elapsed:.1f} s, peak memory {human_bytes(result.peak_memory)}, "
             f"train loss {_rounded(result.train_loss)}, validation loss {_rounded(val_loss)}; outputs in {out}")
    return result


def _result(run: _Run, status: str, last: StepResult | None, val_loss: float | None, elapsed: float) -> TrainResult:
    session = run.session
    report = session.report()
    return TrainResult(run.out, session.state.step, status, last.loss if last else None, val_loss, elapsed,
                       peak_memory_bytes(session.device), report.trainable, report.total)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _val_logged(metrics: MetricSinks, step: int) -> bool:
    return metrics.enabled and metrics.path.is_file() and any(
        r.get("step") == step and "val_loss" in r for r in read_metrics(metrics.path))


def _rounded_all(values: dict[str, float], prefix: str = "") -> dict[str, float]:
    return {prefix + k: round(v, 6) for k, v in values.items()}


def _write_val(metrics: MetricSinks, step: int, loss: float, measured: dict[str, float] | None = None) -> None:
    """One validation line of the metrics: the loss, and what a preference or RL objective measured (as
    ``val_rewards/accuracies`` ...); perplexity only for the cross-entropy of sft."""
    if measured:
        metrics.write({"step": step, "val_loss": round(loss, 6), **_rounded_all(measured, "val_")})
        return
    metrics.write({"step": step, "val_loss": round(loss, 6), "val_ppl": round(perplexity(loss), 3)})


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)
