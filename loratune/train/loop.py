"""One training loop for LoRA and full fine-tuning: which parameters train is the only difference.

``train(recipe)`` loads the base model, injects the adapter (or unfreezes everything), runs
AdamW with warm-up and decay through :func:`~loratune.train.step.train_step`, evaluates,
checkpoints (resumable bit-for-bit), and writes the adapter, ``metrics.jsonl``, ``loss.png``,
``samples.json`` and the resolved recipe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.peft_format import save_adapter
from ..adapters.targets import inject_lora
from ..adapters.trainable import parameter_report, set_trainable
from ..data import Batches, load_tokenizer, prepare_data
from ..errors import ConfigError
from ..generate import SamplingConfig, generate
from ..generate.chat import chat_prompt
from ..hub.export import save_hf_model
from ..hub.files import read_config
from ..hub.outdir import prepare_output_dir, run_lock
from ..models import check_tokenizer_fits, load_model
from ..models.checkpointing import set_activation_checkpointing
from ..recipe import Recipe, dump_recipe, result_fields
from ..quant.model import cast_base, load_dtype, quantize_model, recipe_quantization
from .allocator import prefer_memory
from .checkpoint import (TrainState, clean_checkpoint_dir, list_checkpoints, load_checkpoint, remove_checkpoints,
                         save_checkpoint)
from .guards import check_resources, disk_error
from .metrics import MetricsLog, human_bytes, peak_memory_bytes, perplexity, plot_losses
from .optim import make_optimizer, make_scheduler
from .precision import autocast_for, pick_device, resolve_precision, store_in_bf16
from .step import NonFiniteStep, StepResult, TrainingStopped, evaluate, train_step

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


def resolve_device(recipe: Recipe) -> tuple[Recipe, torch.device]:
    """The recipe with ``device: auto`` and ``precision: auto`` made concrete (the choices are logged)."""
    device = pick_device(recipe.device)
    if recipe.device == "auto":
        log.info(f"device: auto -> {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={recipe.device!r}, but no CUDA GPU is available here; use --set device=cpu")
    precision, why = resolve_precision(recipe.precision, device)
    if why:
        log.info(f"precision: auto -> {precision} ({why})")
    return dataclasses.replace(recipe, precision=precision, device=str(device)), device


def setup_model(recipe: Recipe, device: torch.device):
    """Base model + adapter (or full unfreezing) + precision; returns (model, tokenizer, model_dir).

    The weights load straight into the dtype they train in, tensor by tensor: bf16 for bf16-true
    (a bf16 hub checkpoint is never widened to float32 on the way), float32 otherwise (fp32 and
    bf16-mixed keep float32 masters, whatever the checkpoint's dtype).
    """
    dtype = torch.bfloat16 if recipe.precision == "bf16-true" else torch.float32
    quant = recipe_quantization(recipe)
    if quant or recipe.activation_checkpointing:
        prefer_memory(device)
    model, model_dir = load_model(recipe.model, dtype=load_dtype(recipe.model, dtype) if quant else dtype,
                                  device=device)
    context = model.config.context_length
    if recipe.seq_len > context:
        raise ConfigError(f"seq_len={recipe.seq_len} exceeds the model's context of {context} tokens; "
                          f"set seq_len <= {context}")
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(model, tokenizer)
    if recipe.finetune == "lora":
        inject_lora(model, recipe.lora)
        model.to(device)
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
          overwrite: bool = False) -> TrainResult:
    """Run the recipe; see the module docstring. Raises TrainingStopped on a NaN loss.

    The output directory must be new or empty unless ``resume`` (continue the run there) or
    ``overwrite`` (start over: its checkpoints are removed once the new run is set up). The run
    holds a lock there while it runs. ``force_resume`` continues from a checkpoint even when the
    recipe's result-changing fields differ from the ones the checkpoint was made with. Nothing
    in the directory changes before the recipe, model, data and resources have been checked.
    """
    recipe, device = resolve_device(recipe)
    torch.manual_seed(recipe.seed)
    out = Path(recipe.out_dir).expanduser()
    clean_checkpoint_dir(out / "checkpoints")  # unfinished writes go, swapped-out checkpoints return
    if not resume and not overwrite and list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, --overwrite to start over, "
                          "or choose another --out")
    out = prepare_output_dir(out, resume=resume, overwrite=overwrite)
    with run_lock(out):
        run = _start(recipe, device, out, resume, force_resume)
        if overwrite and not resume:
            remove_checkpoints(run.ckpt_root)
        (out / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")  # once the run is validated
        run.samples = _read_samples(out / "samples.json", recipe.sample_prompt) if resume else _first_sample(run)
        start_time = time.perf_counter()
        status, last = _loop(run, progress)
        elapsed = time.perf_counter() - start_time
        path = save_checkpoint(run.ckpt_root, run.model, run.optimizer, run.scheduler, run.state,
                               recipe.keep_checkpoints, run.recipe_fields)
        if status == "interrupted":
            log.info(f"stopped at step {run.state.step}; checkpoint {path}. Continue with: loratune train ... --resume")
            return _result(run, status, last, None, elapsed)
        return _finish(run, path, last, elapsed)


def _start(recipe: Recipe, device: torch.device, out: Path, resume: bool, force_resume: bool) -> _Run:
    """Model, data, optimizer and (on resume) the last checkpoint's state."""
    model, tokenizer, model_dir = setup_model(recipe, device)
    log.info(f"model: {recipe.model} | finetune: {recipe.finetune} | precision: {recipe.precision}")
    log.info(str(parameter_report(model)))
    train_ex, val_ex = prepare_data(recipe.data, tokenizer, recipe.seq_len, recipe.seed)
    batches = Batches(train_ex, recipe.batch_size, seed=recipe.seed, shuffle=recipe.data.shuffle,
                      pad_id=tokenizer.pad_id)
    val_batches = Batches(val_ex, recipe.micro_batch_size, shuffle=False, pad_id=tokenizer.pad_id,
                          drop_last=False) if val_ex else None
    total_steps = recipe.max_steps or recipe.epochs * len(batches)
    log.info(f"data: {len(train_ex)} train / {len(val_ex)} validation sequences, {len(batches)} batches per epoch, "
             f"{total_steps} steps")
    check_resources(model, recipe, device, out)  # refuse now what would run out of memory or disk later
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, total_steps)
    state = TrainState(step=0)
    fields = result_fields(recipe)  # once: it reads the data files' digests
    if resume:
        found = list_checkpoints(out / "checkpoints")
        if not found:
            raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
        state = load_checkpoint(found[-1], model, optimizer, scheduler, fields, force=force_resume)
        log.info(f"resumed from {found[-1]} (step {state.step})")
    return _Run(recipe, device, out, model, tokenizer, model_dir, batches, val_batches, total_steps, optimizer,
                scheduler, state, MetricsLog(out / "metrics.jsonl", resume_step=state.step if resume else None),
                autocast_for(recipe.precision, device), {}, fields)


def _first_sample(run: _Run) -> dict:
    """The sample before training (and the validation curve's starting point), written when the run starts."""
    recipe = run.recipe
    samples = {"prompt": recipe.sample_prompt, "before": sample_text(run.model, run.tokenizer, recipe, run.device)}
    (run.out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
    log.info(f"sample before training: {samples['before']!r}")
    if run.val_batches and recipe.eval_every:
        _write_val(run.metrics, 0, evaluate(run.model, run.val_batches, run.device, run.autocast, recipe.eval_batches))
    return samples


def _loop(run: _Run, progress: bool) -> tuple[str, StepResult | None]:
    """Steps until the end or a stop request; returns ('done' | 'interrupted', the last step)."""
    recipe, state = run.recipe, run.state
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    run.model.train()
    meter = _Throughput()
    last = None
    bar = _progress_bar(run.total_steps, state.step, progress)
    with StopRequest() as stop:
        while state.step < run.total_steps:
            step = state.step
            batch = run.batches.batch(step // len(run.batches), step % len(run.batches))
            try:
                last = train_step(run.model, batch, run.optimizer, run.scheduler, recipe, run.device, run.autocast,
                                  trainable)
            except NonFiniteStep as exc:
                raise _stopped(run, step + 1, exc) from None
            state.step += 1
            meter.add(last.tokens)
            _after_step(run, last, meter, bar)
            if stop.requested:
                break
    if bar is not None:
        bar.close()
    return ("interrupted" if stop.requested else "done"), last


def _stopped(run: _Run, step: int, exc: NonFiniteStep) -> TrainingStopped:
    good = list_checkpoints(run.ckpt_root)
    run.metrics.write({"step": step, "error": f"non-finite {exc.what}"})
    return TrainingStopped(
        f"{exc.what} became {exc.value} at step {step}; stopping. Last good checkpoint: "
        f"{good[-1] if good else 'none'}. Try a lower lr or weight_decay, bf16-mixed instead of bf16-true, or check "
        "the data; resume with --resume")


def _after_step(run: _Run, result: StepResult, meter: "_Throughput", bar) -> None:
    """Metrics, periodic evaluation, the progress bar and periodic checkpoints after a step."""
    recipe, step, total = run.recipe, run.state.step, run.total_steps
    lr = run.scheduler.get_last_lr()[0]
    if recipe.log_every and (step % recipe.log_every == 0 or step == total):
        run.metrics.write({"step": step, "loss": round(result.loss, 6), "lr": lr,
                           "tokens_per_s": round(meter.window_rate(), 1), "elapsed_s": round(meter.elapsed(), 2),
                           "grad_norm": round(result.grad_norm, 6)})
    if run.val_batches and recipe.eval_every and step % recipe.eval_every == 0 and step < total:
        _write_val(run.metrics, step, evaluate(run.model, run.val_batches, run.device, run.autocast,
                                               recipe.eval_batches))
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{meter.rate():.0f}")
    if recipe.save_every and step % recipe.save_every == 0 and step < total:
        save_checkpoint(run.ckpt_root, run.model, run.optimizer, run.scheduler, run.state, recipe.keep_checkpoints,
                        run.recipe_fields)


class _Throughput:
    """Tokens per second over the whole run and since the last logged line."""

    def __init__(self) -> None:
        self.start = self.window_start = time.perf_counter()
        self.tokens = self.window_tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.window_tokens += tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return self.tokens / max(self.elapsed(), 1e-9)

    def window_rate(self) -> float:
        now = time.perf_counter()
        rate = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_tokens, self.window_start = 0, now
        return rate


def _finish(run: _Run, path: Path, last: StepResult | None, elapsed: float) -> TrainResult:
    """Final validation, the result (adapter or model), the loss plot and the sample after training."""
    recipe, out = run.recipe, run.out
    val_loss = None
    if run.val_batches:
        val_loss = evaluate(run.model, run.val_batches, run.device, run.autocast, recipe.eval_batches)
        _write_val(run.metrics, run.state.step, val_loss)
    try:
        _save_result(run.model, recipe, out, run.model_dir)
    except OSError as exc:
        raise disk_error(exc, f"the result in {out}", f"checkpoint {path} holds the trained weights") from None
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{recipe.finetune} fine-tuning of {recipe.model}")
    run.samples["after"] = sample_text(run.model, run.tokenizer, recipe, run.device)
    (out / "samples.json").write_text(json.dumps(run.samples, indent=2) + "\n", encoding="utf-8")
    result = _result(run, "done", last, val_loss, elapsed)
    log.info(f"sample after training: {run.samples['after']!r}")
    log.info(f"done: {result.steps} steps in {elapsed:.1f} s, peak memory {human_bytes(result.peak_memory)}, "
             f"train loss {_rounded(result.train_loss)}, validation loss {_rounded(val_loss)}; outputs in {out}")
    return result


def _result(run: _Run, status: str, last: StepResult | None, val_loss: float | None, elapsed: float) -> TrainResult:
    report = parameter_report(run.model)
    return TrainResult(run.out, run.state.step, status, last.loss if last else None, val_loss, elapsed,
                       peak_memory_bytes(run.device), report.trainable, report.total)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
                    "(Ctrl-C again to abort without saving)")

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _write_val(metrics: MetricsLog, step: int, loss: float) -> None:
    """One validation line of metrics.jsonl."""
    metrics.write({"step": step, "val_loss": round(loss, 6), "val_ppl": round(perplexity(loss), 3)})


def sample_text(model: nn.Module, tokenizer, recipe: Recipe, device: torch.device) -> str:
    """A short continuation of the recipe's sample prompt (seeded top-k sampling); for the chat task,
    the answer to it as a user message (the recipe's system prompt and template), up to the end of turn."""
    if not recipe.sample_prompt or recipe.sample_tokens == 0:
        return ""
    data = recipe.data
    if data.task == "chat":
        prompt, stops = chat_prompt(tokenizer, recipe.sample_prompt, data.system_prompt, data.chat_template,
                                    **data.template_kwargs)
        shown = ""
    else:
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # as the training documents start
        prompt, stops = bos + tokenizer.encode(recipe.sample_prompt), list(tokenizer.eos_ids)
        shown = recipe.sample_prompt
    cfg = SamplingConfig(max_new_tokens=recipe.sample_tokens, temperature=0.8, top_k=40, seed=recipe.seed)
    was_training = model.training
    model.eval()
    new = generate(model, torch.tensor([prompt], device=device), cfg, eos_ids=stops)[0].tolist()
    model.train(was_training)
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    return shown + tokenizer.decode(new)


def _read_samples(path: Path, prompt: str) -> dict:
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"prompt": prompt}
    return samples if isinstance(samples, dict) and samples.get("prompt") == prompt else {"prompt": prompt}


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
