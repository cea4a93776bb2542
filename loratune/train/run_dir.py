"""A training run's output directory: what it reads, what it writes, and what ``--overwrite`` removes.

The rules (see ``runtime/outdir.py``): the directory never is or holds an input of the run; a run
lists the names it writes in the directory's manifest before writing them; ``--overwrite``
removes only the manifest's names, and only once the new run has been validated (model, data,
resources, and on ``--resume`` the checkpoint), so a run refused at setup changes nothing and a
run that fails after that leaves its own files alone, never the old adapter beside the new
metrics. A file loratune did not write that the run would replace stops the run before anything
changes.

Directories written before the manifest existed: one that holds a complete checkpoint is an
earlier loratune run, so the standard outputs found there (:data:`RUN_OUTPUTS`) are taken as
loratune's, and the manifest is written when the run starts; any other name stays the user's.
Without a complete checkpoint nothing there is taken as loratune's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import ConfigError
from ..runtime.outdir import (owned_outputs, prepare_output_dir, record_outputs, refuse_inputs_inside, refuse_replacing,
                          remove_outputs, run_lock)
from ..recipe import Recipe, dump_recipe
from .checkpoint import clean_checkpoint_dir, list_checkpoints
from .sinks import SINK_DIRECTORIES, sink_directories

RUN_OUTPUTS = ("adapter", "model", "checkpoints", "metrics.jsonl", "loss.png", "samples.json", "recipe.yaml",
               "tensorboard", "wandb", "mlruns")
"""Every name a training run writes in its output directory (a run writes ``adapter`` or ``model``, and the
directories of the metric sinks its ``report_to`` names: see sinks.py)."""


def run_outputs(recipe: Recipe) -> list[str]:
    """The names this run writes in its output directory."""
    result = "adapter" if recipe.finetune == "lora" else "model"
    optional = ("adapter", "model", *SINK_DIRECTORIES)
    return [n for n in RUN_OUTPUTS if n not in optional] + [result] + sink_directories(recipe.report_to)


def run_inputs(recipe: Recipe, recipe_file: str | Path | None) -> list[tuple[str, str | None]]:
    """(what, path) of every file or directory the run reads: recipe, model, data, template."""
    data = recipe.data
    return [("the recipe", None if recipe_file is None else str(recipe_file)), ("the model", recipe.model),
            ("the data", data.source), ("the validation data", data.val_source),
            ("the chat template", data.chat_template)]


def claim_run_dir(out: Path, recipe: Recipe, recipe_file: str | Path | None, resume: bool, overwrite: bool,
                  held: contextlib.ExitStack) -> set[str]:
    """Rank 0's (or the only process's) part before loading anything: refuse what must be refused,
    then make the directory ready and take its lock. Returns the names there that loratune wrote
    (what ``--overwrite`` will remove). Changes nothing but the lock and what killed runs left
    unfinished under ``checkpoints/``."""
    earlier = RUN_OUTPUTS if list_checkpoints(out / "checkpoints") else ()
    owned = owned_outputs(out, earlier) if out.is_dir() else set()
    own_recipe = [out / "recipe.yaml"] if resume and "recipe.yaml" in owned else []  # a resumed run reads its own
    clean_checkpoint_dir(out / "checkpoints")  # unfinished writes go, swapped-out checkpoints return
    if not resume and not overwrite and list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, --overwrite to start over, "
                          "or choose another --out")
    prepare_output_dir(out, resume=resume, overwrite=overwrite)  # without either, a directory holding anything
    refuse_inputs_inside(out, run_inputs(recipe, recipe_file), own=own_recipe)  # is refused first: no input there
    held.enter_context(run_lock(out))  # a live run there is named before what it is in the middle of writing
    if resume and not list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
    if resume or overwrite:
        refuse_replacing(out, run_outputs(recipe), owned)
    return owned


def open_run_dir(out: Path, recipe: Recipe, owned: set[str], overwrite: bool) -> None:
    """Once the run is validated (rank 0): ``--overwrite`` removes the earlier run's outputs, all of
    them; the manifest lists this run's; the resolved recipe is written."""
    if overwrite:
        remove_outputs(out, owned)
    record_outputs(out, run_outputs(recipe))
    (out / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")


def refuse_going_back(out: Path, step: int, total_steps: int, checkpoint: Path) -> None:
    """A resumed run whose recipe ends before the step its checkpoint reached is refused: training
    cannot go back, and finishing it would write a recipe.yaml and metrics that no run produced."""
    if step > total_steps:
        raise ConfigError(f"the run in {out} is at step {step} ({checkpoint.name}) and this recipe ends at step "
                          f"{total_steps}, but a run cannot go back: give max_steps >= {step} to continue it, or "
                          "start a new run in another --out")
