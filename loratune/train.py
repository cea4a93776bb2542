"""One training loop for LoRA and full fine-tuning: which parameters train is the only difference.

``train(recipe)`` loads the base model, injects the adapter (or unfreezes everything), runs
AdamW with warm-up and decay, evaluates, checkpoints (resumable bit-for-bit), and writes the
adapter, ``metrics.jsonl``, ``loss.png``, ``samples.json`` and the resolved recipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import save_adapter
from .resume import TrainState, clean_checkpoint_dir, list_checkpoints, load_checkpoint, save_checkpoint
from .data import Batches, prepare_data
from .errors import ConfigError, LoratuneError
from .export import save_hf_model
from .generate import SamplingConfig, generate
from .guards import check_resources, disk_error
from .loss import count_targets, lm_loss_sum
from .models import load_model
from .params import parameter_report, set_trainable
from .recipe import Recipe, dump_recipe
from .report import MetricsLog, human_bytes, peak_memory_bytes, perplexity, plot_losses
from .targets import inject_lora
from .tokenizer import load_tokenizer

log = logging.getLogger("loratune")


class TrainingStopped(LoratuneError):
    """The run stopped early (NaN loss); the message names the step and the last good checkpoint."""


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


def setup_model(recipe: Recipe, device: torch.device):
    """Base model + adapter (or full unfreezing) + precision; returns (model, tokenizer, model_dir)."""
    model, model_dir = load_model(recipe.model, device=device)
    if recipe.seq_len > model.config.n_positions:
        raise ConfigError(f"seq_len={recipe.seq_len} exceeds the model's context of {model.config.n_positions} "
                          f"tokens; set seq_len <= {model.config.n_positions}")
    tokenizer = load_tokenizer(model_dir)
    if recipe.finetune == "lora":
        inject_lora(model, recipe.lora)
        model.to(device)
    set_trainable(model, recipe.finetune)
    if recipe.precision == "bf16-true":
        store_in_bf16(model, recipe.finetune)
    return model, tokenizer, model_dir


def store_in_bf16(model: nn.Module, finetune: str) -> None:
    """bf16-true: frozen weights live in bf16 (no cast each step); LoRA keeps float32 masters.

    With full fine-tuning every weight is bf16 (pure bf16 training).
    """
    for p in model.parameters():
        if not p.requires_grad or finetune == "full":
            p.data = p.data.to(torch.bfloat16)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases and LayerNorm parameters are 1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.adam_betas, eps=recipe.adam_eps)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int):
    """Linear warm-up to lr, then constant, linear to 0, or cosine to 0."""
    warm = recipe.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if recipe.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if recipe.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(recipe: Recipe, device: torch.device):
    """bf16 autocast for bf16-mixed; a no-op context otherwise."""
    if recipe.precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device, autocast, max_batches: int | None = None) -> float:
    """Token-weighted mean cross-entropy over (up to ``max_batches`` of) ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(len(batches)):
        if max_batches is not None and i >= max_batches:
            break
        batch = batches.batch(0, i)
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        with autocast:
            total += float(lm_loss_sum(model, x, y))
        count += count_targets(y)
    model.train(was_training)
    if count == 0:
        raise LoratuneError("the validation data has no target tokens")
    return total / count


def forward_backward(model: nn.Module, batch: dict[str, torch.Tensor], recipe: Recipe, device: torch.device,
                     autocast, trainable: list[nn.Parameter]) -> tuple[float, float]:
    """Gradients of one optimizer step's batch, in ``grad_accum`` micro-batches, then clipped.

    The loss is token-weighted over the whole batch (each micro-batch's summed loss is divided by
    the batch's target count), so the split changes memory, not the result. Returns the step's
    loss and the gradient norm before clipping; the norm is taken even without clipping
    (max_norm inf), so an Inf gradient is seen.
    """
    x_all, y_all = batch["input_ids"].to(device), batch["labels"].to(device)
    n_targets = max(1, count_targets(y_all))
    loss_total = 0.0
    for x, y in zip(x_all.split(recipe.micro_batch_size), y_all.split(recipe.micro_batch_size)):
        with autocast:
            loss = lm_loss_sum(model, x, y) / n_targets
        loss.backward()
        loss_total += float(loss.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, recipe.max_grad_norm or math.inf))
    return loss_total, grad_norm


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
    """A short continuation of the recipe's sample prompt (seeded top-k sampling)."""
    if not recipe.sample_prompt or recipe.sample_tokens == 0:
        return ""
    ids = torch.tensor([tokenizer.encode(recipe.sample_prompt)], device=device)
    cfg = SamplingConfig(max_new_tokens=recipe.sample_tokens, temperature=0.8, top_k=40, seed=recipe.seed)
    was_training = model.training
    model.eval()
    new = generate(model, ids, cfg, eos_id=tokenizer.eos_id)[0].tolist()
    model.train(was_training)
    return recipe.sample_prompt + tokenizer.decode([t for t in new if t != tokenizer.eos_id])


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run the recipe; see the module docstring. Raises TrainingStopped on a NaN loss."""
    device = torch.device(recipe.device)
    torch.manual_seed(recipe.seed)
    out = Path(recipe.out_dir)
    ckpt_root = out / "checkpoints"
    clean_checkpoint_dir(ckpt_root)  # what a killed run left: unfinished writes go, swapped-out checkpoints return
    if not resume and list_checkpoints(ckpt_root):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")

    model, tokenizer, model_dir = setup_model(recipe, device)
    report = parameter_report(model)
    log.info(f"model: {recipe.model} | finetune: {recipe.finetune} | precision: {recipe.precision}")
    log.info(str(report))
    train_ex, val_ex = prepare_data(recipe.data, tokenizer, recipe.seq_len, recipe.seed)
    batches = Batches(train_ex, recipe.batch_size, seed=recipe.seed, shuffle=recipe.data.shuffle,
                      pad_id=tokenizer.eos_id)
    if len(batches) == 0:
        raise ConfigError(f"only {len(train_ex)} training examples: fewer than one batch of {recipe.batch_size}")
    val_batches = Batches(val_ex, recipe.micro_batch_size, shuffle=False, pad_id=tokenizer.eos_id,
                          drop_last=False) if val_ex else None
    total_steps = recipe.max_steps or recipe.epochs * len(batches)
    log.info(f"data: {len(train_ex)} train / {len(val_ex)} validation sequences, {len(batches)} batches per epoch, "
             f"{total_steps} steps")

    check_resources(model, recipe, device, out)  # refuse now what would run out of memory or disk later
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, total_steps)
    state = TrainState(step=0)
    if resume:
        found = list_checkpoints(ckpt_root)
        if not found:
            raise ConfigError(f"--resume: no complete checkpoint in {ckpt_root}")
        state = load_checkpoint(found[-1], model, optimizer, scheduler)
        log.info(f"resumed from {found[-1]} (step {state.step})")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=state.step if resume else None)
    autocast = autocast_for(recipe, device)
    samples_path = out / "samples.json"
    if resume:  # the sample before training was written when the run started
        samples = _read_samples(samples_path, recipe.sample_prompt)
    else:
        samples = {"prompt": recipe.sample_prompt, "before": sample_text(model, tokenizer, recipe, device)}
        samples_path.write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
        log.info(f"sample before training: {samples['before']!r}")
        if val_batches and recipe.eval_every:  # the starting point of the validation curve
            val0 = evaluate(model, val_batches, device, autocast, recipe.eval_batches)
            _write_val(metrics, 0, val0)

    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    start_time, tokens_seen, window_tokens, window_start = time.perf_counter(), 0, 0, time.perf_counter()
    last_loss = val_loss = None
    status = "done"
    bar = _progress_bar(total_steps, state.step, progress)
    with StopRequest() as stop:
        while state.step < total_steps:
            step = state.step
            batch = batches.batch(step // len(batches), step % len(batches))
            loss_total, grad_norm = forward_backward(model, batch, recipe, device, autocast, trainable)
            if not math.isfinite(loss_total) or not math.isfinite(grad_norm):
                good = list_checkpoints(ckpt_root)
                what = "loss" if not math.isfinite(loss_total) else "gradient norm"
                metrics.write({"step": step + 1, "error": f"non-finite {what}"})
                raise TrainingStopped(
                    f"{what} became {loss_total if what == 'loss' else grad_norm} at step {step + 1}; stopping. "
                    f"Last good checkpoint: {good[-1] if good else 'none'}. Try a lower lr, bf16-mixed instead "
                    "of bf16-true, or check the data; resume with --resume")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            last_loss = loss_total
            n_tok = batch["input_ids"].numel()
            tokens_seen += n_tok
            window_tokens += n_tok
            if recipe.log_every and (state.step % recipe.log_every == 0 or state.step == total_steps):
                now = time.perf_counter()
                rate = window_tokens / max(now - window_start, 1e-9)
                record = {"step": state.step, "loss": round(loss_total, 6), "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": round(rate, 1), "elapsed_s": round(now - start_time, 2),
                          "grad_norm": round(grad_norm, 6)}
                metrics.write(record)
                window_tokens, window_start = 0, now
            if val_batches and recipe.eval_every and state.step % recipe.eval_every == 0 and state.step < total_steps:
                val_loss = evaluate(model, val_batches, device, autocast, recipe.eval_batches)
                _write_val(metrics, state.step, val_loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_total:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                tok_s=f"{tokens_seen / max(time.perf_counter() - start_time, 1e-9):.0f}")
            if recipe.save_every and state.step % recipe.save_every == 0 and state.step < total_steps:
                save_checkpoint(ckpt_root, model, optimizer, scheduler, state, recipe.keep_checkpoints)
            if stop.requested:
                status = "interrupted"
                break
    if bar is not None:
        bar.close()
    path = save_checkpoint(ckpt_root, model, optimizer, scheduler, state, recipe.keep_checkpoints)
    elapsed = time.perf_counter() - start_time
    if status == "interrupted":
        log.info(f"stopped at step {state.step}; checkpoint {path}. Continue with: loratune train ... --resume")
        return TrainResult(out, state.step, status, last_loss, val_loss, elapsed, peak_memory_bytes(device),
                           report.trainable, report.total)

    if val_batches:
        val_loss = evaluate(model, val_batches, device, autocast, recipe.eval_batches)
        _write_val(metrics, state.step, val_loss)
    try:
        _save_result(model, recipe, out, model_dir)
    except OSError as exc:
        raise disk_error(exc, f"the result in {out}", f"checkpoint {path} holds the trained weights") from None
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{recipe.finetune} fine-tuning of {recipe.model}")
    samples["after"] = sample_text(model, tokenizer, recipe, device)
    samples_path.write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
    peak = peak_memory_bytes(device)
    log.info(f"sample after training: {samples['after']!r}")
    log.info(f"done: {state.step} steps in {elapsed:.1f} s, peak memory {human_bytes(peak)}, "
             f"train loss {last_loss if last_loss is None else round(last_loss, 4)}, "
             f"validation loss {val_loss if val_loss is None else round(val_loss, 4)}; outputs in {out}")
    return TrainResult(out, state.step, status, last_loss, val_loss, elapsed, peak, report.trainable, report.total)


def _read_samples(path: Path, prompt: str) -> dict:
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"prompt": prompt}
    return samples if isinstance(samples, dict) and samples.get("prompt") == prompt else {"prompt": prompt}


def _save_result(model: nn.Module, recipe: Recipe, out: Path, model_dir: Path) -> None:
    if recipe.finetune == "lora":
        save_adapter(model, out / "adapter", recipe.lora, base_model=recipe.model)
    else:
        save_hf_model(model, out / "model", tokenizer_dir=model_dir)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)
