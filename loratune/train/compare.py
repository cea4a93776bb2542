"""LoRA against full fine-tuning on the same recipe: parameters, peak memory, time per step, loss.

Each mode runs in its own fresh process so that its peak memory is its own; both see the same
data, seed and hyper-parameters, and only which parameters train differs.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue as queue_module
import statistics
import time

import torch

from ..errors import ConfigError, LoratuneError
from ..recipe import Recipe
from .metrics import human_bytes, peak_memory_bytes
from .session import TrainingSession, resolve_device


def check_steps(steps: int, warmup: int = 0) -> None:
    """ConfigError unless at least one step is timed: the median time per step needs one.

    Why here: without it ``--steps 0`` runs both models and then fails with statistics' "no
    median for empty data", which names neither the flag nor the fix.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be a whole number >= 1 (timed steps per mode), got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a whole number >= 0, got {warmup!r}")


def measure(recipe: Recipe, steps: int, warmup: int = 1) -> dict:
    """Run ``warmup + steps`` optimizer steps of ``recipe``'s session (every example trains, no schedule: a
    few steps at the recipe's peak lr); time the last ``steps``."""
    check_steps(steps, warmup)
    recipe, device = resolve_device(recipe)
    torch.manual_seed(recipe.seed)
    session = TrainingSession.from_recipe(recipe, validation=False, schedule=False)
    report = session.report()
    times, losses = [], []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = session.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(result.loss)
    return {"finetune": recipe.finetune, "precision": recipe.precision, "trainable": report.trainable, "total": report.total,
            "peak_memory": peak_memory_bytes(device), "step_s": statistics.median(times),
            "tokens_per_s": recipe.batch_size * recipe.seq_len / statistics.median(times), "loss": losses[-1],
            "first_loss": losses[0]}


def _child(recipe: Recipe, steps: int, queue) -> None:
    try:
        queue.put(("ok", measure(recipe, steps)))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def compare(recipe: Recipe, steps: int = 5) -> list[dict]:
    """Measure the recipe as LoRA and as full fine-tuning, each in a fresh process."""
    check_steps(steps)  # before starting any process
    ctx = mp.get_context("spawn")
    rows = []
    for mode in ("lora", "full"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(dataclasses.replace(recipe, finetune=mode), steps, queue))
        proc.start()
        while True:
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not proc.is_alive():  # killed outright (out of memory, signal): no report will come
                    status, payload = "error", f"the process died with exit code {proc.exitcode}"
                    break
        proc.join()
        if status != "ok":
            raise LoratuneError(f"{mode} run failed: {payload}")
        rows.append(payload)
    return rows


def format_table(rows: list[dict], steps: int) -> str:
    """The tutorial's comparison as a text table, with full/LoRA ratios."""
    lora, full = rows
    lines = [f"{'':26}{'LoRA':>16}{'full':>16}{'full / LoRA':>14}"]

    def row(name, key, fmt, ratio=True):
        a, b = lora[key], full[key]
        r = f"{b / a:>13.2f}x" if ratio and a else f"{'':>14}"
        lines.append(f"{name:26}{fmt(a):>16}{fmt(b):>16}{r}")

    row("trainable parameters", "trainable", lambda v: f"{v:,}")
    shares = [f"{100 * r['trainable'] / r['total']:.2f}%" for r in (lora, full)]  # each of its own total
    lines.append(f"{'share of all parameters':26}{shares[0]:>16}{shares[1]:>16}")
    row("peak memory", "peak_memory", human_bytes)
    row("time per step (median)", "step_s", lambda v: f"{v * 1000:.0f} ms")
    row("tokens per second", "tokens_per_s", lambda v: f"{v:,.0f}")
    row("loss at step 1", "first_loss", lambda v: f"{v:.4f}", ratio=False)
    row(f"loss at step {steps + 1}", "loss", lambda v: f"{v:.4f}", ratio=False)
    return "\n".join(lines)
