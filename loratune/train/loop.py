"""One training loop for LoRA and full fine-tuning: which parameters train is the only difference.

``train(recipe)`` loads the base model, injects the adapter (or unfreezes everything), runs
AdamW with warm-up and decay through :func:`~loratune.train.step.train_step`, evaluates,
checkpoints (resumable bit-for-bit), and writes the adapter, ``metrics.jsonl``, ``loss.png``,
``samples.json`` and the resolved recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.peft_format import save_adapter
from ..adapters.targets import inject_lora
from ..adapters.trainable import parameter_report, set_trainable
from ..data import Batches, load_tokenizer, prepare_data
from ..dist.parallel import full_trainable_state, is_fsdp, run_on_model, wrap
from ..dist.world import SINGLE, World, agree, rank_failures
from ..errors import ConfigError
from ..hub.export import save_hf_model
from ..hub.files import read_config
from ..models import check_tokenizer_fits, load_model
from ..models.checkpointing import set_activation_checkpointing
from ..recipe import Recipe, result_fields
from ..quant.model import cast_base, load_dtype, quantize_model, recipe_quantization
from .allocator import prefer_memory
from .checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from .guards import check_resources, disk_error
from .loss import CausalLMLoss
from .metrics import MetricsLog, Throughput, human_bytes, peak_memory_bytes, perplexity, plot_losses, read_metrics
from .optim import make_optimizer, make_scheduler
from .precision import autocast_for, pick_device, resolve_precision, store_in_bf16
from .run_dir import claim_run_dir, open_run_dir, refuse_going_back
from .samples import read_samples, sample_text
from .step import NonFiniteStep, StepResult, TrainingStopped, evaluate, train_step
from .stop import StopRequest

log = logging.getLogger("loratune")


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


def resolve_device(recipe: Recipe, world: World = SINGLE) -> tuple[Recipe, torch.device]:
    """The recipe with ``device: auto`` and ``precision: auto`` made concrete (the choices are logged);
    a rank of a launch takes its own device (see dist/world.py)."""
    device = world.device(recipe.device) if world.distributed else pick_device(recipe.device)
    if recipe.device == "auto":
        log.info(f"device: auto -> {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={recipe.device!r}, but no CUDA GPU is available here; use --set device=cpu")
    precision, why = resolve_precision(recipe.precision, device)
    if why:
        log.info(f"precision: auto -> {precision} ({why})")
    return dataclasses.replace(recipe, precision=precision, device=str(device)), device


def setup_model(recipe: Recipe, device: torch.device, load_device: torch.device | None = None):
    """Base model + adapter (or full unfreezing) + precision; returns (model, tokenizer, model_dir).
    ``load_device``: where the weights go when it is not the device they train on (FSDP2 loads on
    the CPU and moves each rank's shards).

    The weights load straight into the dtype they train in, tensor by tensor: bf16 for bf16-true
    (a bf16 hub checkpoint is never widened to float32 on the way), float32 otherwise (fp32 and
    bf16-mixed keep float32 masters, whatever the checkpoint's dtype).
    """
    dtype = torch.bfloat16 if recipe.precision == "bf16-true" else torch.float32
    quant = recipe_quantization(recipe)
    if quant or recipe.activation_checkpointing:
        prefer_memory(device)
    load_device = load_device or device
    model, model_dir = load_model(recipe.model, dtype=load_dtype(recipe.model, dtype) if quant else dtype,
                                  device=load_device)
    context = model.config.context_length
    if recipe.seq_len > context:
        raise ConfigError(f"seq_len={recipe.seq_len} exceeds the model's context of {context} tokens; "
                          f"set seq_len <= {context}")
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(model, tokenizer)
    if recipe.finetune == "lora":
        inject_lora(model, recipe.lora)
        model.to(load_device)
        if quant:  # QLoRA: the frozen base in 4 bits, after the adapter (PiSSA's residual is what is quantized)
            quantize_model(model, quant)
            cast_base(model, dtype)
    set_trainable(model, recipe.finetune)
    if recipe.precision == "bf16-true":
        store_in_bf16(model, recipe.finetune)
    set_activation_checkpointing(model, recipe.activation_checkpointing, recipe.activation_offload, device)
    return model, tokenizer, model_dir


@dataclass
class _Run:
    """Everything one training run holds while it trains."""

    recipe: Recipe
    device: torch.device
    out: Path
    model: nn.Module
    """The model (under FSDP2, its weights are sharded in place)."""
    trainer: nn.Module
    """What a step runs: the model, or (launched) the model and its loss under DDP or FSDP2."""
    world: World
    tokenizer: object
    model_dir: Path
    batches: Batches
    val_batches: Batches | None
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainState
    metrics: MetricsLog
    autocast: object
    samples: dict
    recipe_fields: dict
    """The recipe's result-changing fields, recorded in every checkpoint."""

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
    the lock and writes every output; all ranks train, evaluate, sample and checkpoint together.
    """
    recipe, device = resolve_device(recipe, world)
    torch.manual_seed(recipe.seed)
    out = Path(recipe.out_dir).expanduser()
    with contextlib.ExitStack() as held, rank_failures(world):
        owned = agree(world, lambda: claim_run_dir(out, recipe, recipe_file, resume, overwrite, held),
                      "preparing the output directory", main_only=True)
        run = _start(recipe, device, out, resume, force_resume, world,
                     functools.partial(open_run_dir, out, recipe, owned, overwrite and not resume))
        run.samples = read_samples(out / "samples.json", recipe.sample_prompt) if resume else _first_sample(run)
        start_time = time.perf_counter()
        status, last = _loop(run, progress and world.main)
        elapsed = time.perf_counter() - start_time
        path = _save(run)
        if status == "interrupted":
            log.info(f"stopped at step {run.state.step}; checkpoint {path}. Continue with: loratune train ... --resume")
            return _result(run, status, last, None, elapsed)
        return _finish(run, path, last, elapsed)


def _save(run: "_Run") -> Path:
    return save_checkpoint(run.ckpt_root, run.model, run.optimizer, run.scheduler, run.state,
                           run.recipe.keep_checkpoints, run.recipe_fields, run.world, run.recipe.strategy)


def _start(recipe: Recipe, device: torch.device, out: Path, resume: bool, force_resume: bool,
           world: World, open_dir) -> _Run:
    """Model, data, optimizer and (on resume) the last checkpoint's state; then (rank 0) ``open_dir``:
    the first change to the output directory, once all of that is known to be good."""
    model, tokenizer, model_dir, batches, val_batches, total_steps = agree(
        world, lambda: _load(recipe, device, out, world), "loading the model and data")
    trainer = wrap(CausalLMLoss(model), recipe.strategy, world, device) if world.distributed else model
    if world.size > 1:  # the same initial weights everywhere (above); from here each rank its own dropout masks
        torch.manual_seed((recipe.seed + world.rank) % 2**64)
    optimizer = make_optimizer(model, recipe)  # after wrapping: FSDP2 has made the parameters shards
    scheduler = make_scheduler(optimizer, recipe, total_steps)
    state = TrainState(step=0)
    fields = result_fields(recipe)  # once: it reads the data files' digests
    if resume:
        found = list_checkpoints(out / "checkpoints")
        if not found:
            raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
        state = load_checkpoint(found[-1], model, optimizer, scheduler, fields, force=force_resume, world=world)
        refuse_going_back(out, state.step, total_steps, found[-1])
        log.info(f"resumed from {found[-1]} (step {state.step})")
    agree(world, open_dir, "writing the run's first files", main_only=True)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=state.step if resume else None, enabled=world.main)
    return _Run(recipe, device, out, model, trainer, world, tokenizer, model_dir, batches, val_batches, total_steps,
                optimizer, scheduler, state, metrics, autocast_for(recipe.precision, device), {}, fields)


def _load(recipe: Recipe, device: torch.device, out: Path, world: World) -> tuple:
    """The model (on the CPU for FSDP2, which moves each rank's shards to its device), the data, and the
    resource check (FSDP2 divides the weights, gradients and optimizer state by the world size)."""
    fsdp = world.distributed and recipe.strategy == "fsdp"
    model, tokenizer, model_dir = setup_model(recipe, device, torch.device("cpu") if fsdp else None)
    log.info(f"model: {recipe.model} | finetune: {recipe.finetune} | precision: {recipe.precision}"
             + (f" | {world.size} processes, {recipe.strategy}" if world.distributed else ""))
    log.info(str(parameter_report(model)))
    train_ex, val_ex = prepare_data(recipe.data, tokenizer, recipe.seq_len, recipe.seed)
    batches = Batches(train_ex, recipe.batch_size, seed=recipe.seed, shuffle=recipe.data.shuffle,
                      pad_id=tokenizer.pad_id)
    val_batches = Batches(val_ex, recipe.micro_batch_size, shuffle=False, pad_id=tokenizer.pad_id,
                          drop_last=False) if val_ex else None
    total_steps = recipe.max_steps or recipe.epochs * len(batches)
    log.info(f"data: {len(train_ex)} train / {len(val_ex)} validation sequences, {len(batches)} batches per epoch, "
             f"{total_steps} steps")
    check_resources(model, recipe, device, out, shards=world.size if fsdp else 1)  # refuse now what would not fit
    return model, tokenizer, model_dir, batches, val_batches, total_steps


def _first_sample(run: _Run) -> dict:
    """The sample before training (and the validation curve's starting point), written when the run starts."""
    recipe = run.recipe
    samples = {"prompt": recipe.sample_prompt, "before": _sample(run)}
    if run.world.main:
        (run.out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
    log.info(f"sample before training: {samples['before']!r}")
    if run.val_batches and recipe.eval_every:
        _write_val(run.metrics, 0, _evaluate(run))
    return samples


def _sample(run: "_Run") -> str:
    """The recipe's sample; every rank of an FSDP2 run takes part (each forward gathers the weights)."""
    return run_on_model(run.trainer, sample_text, run.tokenizer, run.recipe, run.device, is_fsdp(run.trainer))


def _evaluate(run: "_Run") -> float:
    return evaluate(run.trainer, run.val_batches, run.device, run.autocast, run.recipe.eval_batches, run.world)


def _loop(run: _Run, progress: bool) -> tuple[str, StepResult | None]:
    """Steps until the end or a stop request; returns ('done' | 'interrupted', the last step)."""
    recipe, state = run.recipe, run.state
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    if is_fsdp(run.trainer):  # the shards: after a forward the root unit's modules hold its gathered weights
        trainable = [p for group in run.optimizer.param_groups for p in group["params"]]
    run.trainer.train()
    meter = Throughput()
    last = None
    bar = _progress_bar(run.total_steps, state.step, progress)
    stopping = False
    with StopRequest() as stop:
        while state.step < run.total_steps:
            step = state.step
            batch = run.batches.batch(step // len(run.batches), step % len(run.batches))
            try:
                last = train_step(run.trainer, batch, run.optimizer, run.scheduler, recipe, run.device, run.autocast,
                                  trainable, run.world)
            except NonFiniteStep as exc:
                raise _stopped(run, step + 1, exc) from None
            state.step += 1
            meter.add(last.tokens)
            _after_step(run, last, meter, bar)
            if run.world.any(stop.requested):  # every rank stops at the same step
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
    recipe, step, total = run.recipe, run.state.step, run.total_steps
    lr = run.scheduler.get_last_lr()[0]
    if recipe.log_every and (step % recipe.log_every == 0 or step == total):
        run.metrics.write({"step": step, "loss": round(result.loss, 6), "lr": lr,
                           "tokens_per_s": round(meter.window_rate(), 1), "elapsed_s": round(meter.elapsed(), 2),
                           "grad_norm": round(result.grad_norm, 6)})
    if run.val_batches and recipe.eval_every and step % recipe.eval_every == 0 and step < total:
        _write_val(run.metrics, step, _evaluate(run))
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{meter.rate():.0f}")
    if recipe.save_every and step % recipe.save_every == 0 and step < total:
        _save(run)


def _finish(run: _Run, path: Path, last: StepResult | None, elapsed: float) -> TrainResult:
    """Final validation, the result (adapter or model), the loss plot and the sample after training."""
    recipe, out = run.recipe, run.out
    val_loss = None
    if run.val_batches:
        val_loss = _evaluate(run)
        if not _val_logged(run.metrics, run.state.step):  # a resume of a finished run has its line already
            _write_val(run.metrics, run.state.step, val_loss)
    run.samples["after"] = _sample(run)
    saved = _model_to_save(run)  # the last collective: what follows is rank 0's alone
    if run.world.main:
        try:
            _save_result(saved, recipe, out, run.model_dir)
        except OSError as exc:
            raise disk_error(exc, f"the result in {out}", f"checkpoint {path} holds the trained weights") from None
        plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{recipe.finetune} fine-tuning of {recipe.model}")
        (out / "samples.json").write_text(json.dumps(run.samples, indent=2) + "\n", encoding="utf-8")
    result = _result(run, "done", last, val_loss, elapsed)
    log.info(f"sample after training: {run.samples['after']!r}")
    log.info(f"done: {result.steps} steps in {elapsed:.1f} s, peak memory {human_bytes(result.peak_memory)}, "
             f"train loss {_rounded(result.train_loss)}, validation loss {_rounded(val_loss)}; outputs in {out}")
    return result


def _model_to_save(run: _Run) -> nn.Module | None:
    """What rank 0 writes the result from: the model itself, or under FSDP2 a copy on rank 0's CPU built
    as the run built its model (same seed) and given the trained tensors, gathered from every rank."""
    if not is_fsdp(run.trainer):
        return run.model
    trained = full_trainable_state(run.model)  # every rank takes part
    if not run.world.main:
        return None
    torch.manual_seed(run.recipe.seed)
    copy = setup_model(dataclasses.replace(run.recipe, device="cpu"), torch.device("cpu"))[0]
    missing = {n for n, p in copy.named_parameters() if p.requires_grad} ^ set(trained)
    if missing:
        raise ConfigError(f"internal: the gathered tensors do not match the model ({sorted(missing)[:3]})")
    copy.load_state_dict(trained, strict=False)
    return copy


def _result(run: _Run, status: str, last: StepResult | None, val_loss: float | None, elapsed: float) -> TrainResult:
    report = parameter_report(run.model)
    return TrainResult(run.out, run.state.step, status, last.loss if last else None, val_loss, elapsed,
                       peak_memory_bytes(run.device), report.trainable, report.total)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _val_logged(metrics: MetricsLog, step: int) -> bool:
    return metrics.enabled and metrics.path.is_file() and any(
        r.get("step") == step and "val_loss" in r for r in read_metrics(metrics.path))


def _write_val(metrics: MetricsLog, step: int, loss: float) -> None:
    """One validation line of metrics.jsonl."""
    metrics.write({"step": step, "val_loss": round(loss, 6), "val_ppl": round(perplexity(loss), 3)})


def _save_result(model: nn.Module, recipe: Recipe, out: Path, model_dir: Path) -> None:
    if recipe.finetune == "lora":
        quant = recipe_quantization(recipe)
        save_adapter(model, out / "adapter", recipe.lora, base_model=recipe.model,
                     base_quantization=quant.record() if quant else None)
    else:
        save_hf_model(model, out / "model", tokenizer_dir=model_dir, base_config=read_config(model_dir),
                      base_dir=model_dir)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)
