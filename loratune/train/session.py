"""One training session: the model, its objective, optimizer, schedule, precision and data, set up once
(torchtune's setup/train split).

:meth:`TrainingSession.from_recipe` builds it from a recipe and the world (one process, or this rank
of a torchrun launch): :func:`setup_model` (base model, adapter or full unfreezing, quantization,
precision, activation checkpointing), the data (:func:`load_data`), the resource check, the
objective's module (under DDP/FSDP2 the wrapped one), AdamW and the schedule. A benchmark that
makes its own model (random weights of a published shape) builds one by keyword instead:
``TrainingSession(recipe=..., device=..., model=..., data=...)``.

Then :meth:`~TrainingSession.step` (one optimizer step, the next batch or a given one),
:meth:`~TrainingSession.evaluate`, :meth:`~TrainingSession.sample`,
:meth:`~TrainingSession.save` (a resumable checkpoint), :meth:`~TrainingSession.resume` and
:meth:`~TrainingSession.save_result` (the adapter or the model). The loop (``loop.py``) adds the
output directory, the metric sinks, periodic evaluation and checkpoints, and stopping; ``compare``
and the benchmarks call the same object, so they time the step the loop runs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.peft_format import save_adapter
from ..adapters.targets import inject_lora
from ..adapters.trainable import ParamReport, parameter_report, set_trainable
from ..data import Batches, load_tokenizer, prepare_data
from ..dist.parallel import is_fsdp, run_on_model, wrap
from ..dist.world import SINGLE, World, agree
from ..errors import ConfigError
from ..hub.export import save_hf_model
from ..hub.files import read_config
from ..models import check_tokenizer_fits, load_model
from ..models.compile import compile_blocks
from ..models.recompute import set_activation_checkpointing
from ..quant.load import inject_quantized, load_quantized, needs_float_start
from ..quant.model import cast_base, load_dtype, recipe_quantization
from ..recipe import Recipe, result_fields
from ..runtime.device import pick_device
from .allocator import prefer_memory
from .checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from .guards import check_resources
from .objective import Objective, make_objective
from .optim import make_optimizer, make_scheduler
from .precision import autocast_for, resolve_precision, store_in_bf16
from .samples import sample_text
from .step import StepResult, evaluate, train_step

log = logging.getLogger("loratune")


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
    bf16-mixed keep float32 masters, whatever the checkpoint's dtype). Under QLoRA each projection
    is quantized as it is read and its float copy freed before the next (:mod:`loratune.quant.load`):
    the float model is never in memory, and the model equals the old order's (inject, then quantize).
    """
    dtype = torch.bfloat16 if recipe.precision == "bf16-true" else torch.float32
    quant = recipe_quantization(recipe) if recipe.finetune == "lora" else None
    if quant or recipe.activation_checkpointing:
        prefer_memory(device)
    load_device = load_device or device
    hook = None
    if quant:
        model, model_dir, hook = load_quantized(recipe.model, quant, load_dtype(recipe.model, dtype), load_device,
                                                keep_readers=needs_float_start(recipe.lora))
    else:
        model, model_dir = load_model(recipe.model, dtype=dtype, device=load_device)
    context = model.config.context_length
    if recipe.seq_len > context:
        raise ConfigError(f"seq_len={recipe.seq_len} exceeds the model's context of {context} tokens; "
                          f"set seq_len <= {context}")
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(model, tokenizer)
    if recipe.finetune == "lora":
        if quant:  # QLoRA: PiSSA's residual is what is quantized, each weight read again for its start
            inject_quantized(model, recipe.lora, quant, hook.readers)
            hook = None  # the readers (and a pickle's tensors they hold) are done with
        else:
            inject_lora(model, recipe.lora)
        model.to(load_device)
        if quant:
            cast_base(model, dtype)
    set_trainable(model, recipe.finetune)
    if recipe.precision == "bf16-true":
        store_in_bf16(model, recipe.finetune)
    set_activation_checkpointing(model, recipe.activation_checkpointing, recipe.activation_offload, device)
    compile_blocks(model, recipe.compile)  # compiled at the first step (models/compile.py)
    return model, tokenizer, model_dir


@dataclass
class TrainingData:
    """The batches a session trains and validates on."""

    batches: Batches
    """The training split, in batches of ``batch_size`` (shuffled per epoch as the recipe says)."""
    val_batches: Batches | None = None
    """The validation split in micro-batches, or None (no validation)."""
    total_steps: int | None = None
    """Optimizer steps of the run (``max_steps``, or ``epochs`` full epochs); None: as the recipe says."""

    def __post_init__(self) -> None:
        if self.total_steps is None:
            self.total_steps = len(self.batches)


def load_data(recipe: Recipe, tokenizer, validation: bool = True, kind: str = "sft", ranks: int = 1) -> TrainingData:
    """The recipe's data as batches (``validation`` False: every example trains, none is held out); ``kind``:
    what the objective trains on (see ``objective.DATA_KINDS``): the recipe's task, preference pairs, KTO's
    unpaired completions, or GRPO's prompts. Those rows are never padded with made-up ones (a made-up pair
    would change the loss), so over ``ranks`` processes every batch and micro-batch must split into whole
    rows: refused otherwise, and the validation items past a multiple of ``ranks`` are left out (logged)."""
    data = recipe.data if validation else dataclasses.replace(recipe.data, val_fraction=0.0)
    if kind != "sft" and ranks > 1 and (recipe.batch_size % ranks or recipe.micro_batch_size % ranks):
        raise ConfigError(f"objective {recipe.objective} gives each of the {ranks} processes whole rows of every "
                          f"batch and micro-batch: batch_size={recipe.batch_size} and its micro-batches of "
                          f"{recipe.micro_batch_size} (batch_size / grad_accum) must be multiples of {ranks}")
    train_ex, val_ex = prepare_data(data, tokenizer, recipe.seq_len, recipe.seed, kind=kind,
                                    prompt_field=recipe.grpo.prompt_field)
    if kind != "sft" and ranks > 1 and len(val_ex) % ranks:
        log.warning(f"validation: the last {len(val_ex) % ranks} of {len(val_ex)} items are left out so that each "
                    f"of the {ranks} processes evaluates whole rows")
        val_ex = val_ex[:len(val_ex) - len(val_ex) % ranks]
    batches = Batches(train_ex, recipe.batch_size, seed=recipe.seed, shuffle=recipe.data.shuffle,
                      pad_id=tokenizer.pad_id)
    val_batches = Batches(val_ex, recipe.micro_batch_size, shuffle=False, pad_id=tokenizer.pad_id,
                          drop_last=False) if val_ex else None
    total_steps = recipe.max_steps or recipe.epochs * len(batches)
    log.info(f"data: {len(train_ex)} train / {len(val_ex)} validation sequences, {len(batches)} batches per epoch, "
             f"{total_steps} steps")
    return TrainingData(batches, val_batches, total_steps)


class TrainingSession:
    """A model set up to train as a recipe says; see the module docstring.

    Built by keyword: ``recipe`` (resolved: a concrete device and precision, see
    :func:`resolve_device`), ``device``, ``model`` (adapter injected and trainability set, as
    :func:`setup_model` leaves it), ``data`` (None: :meth:`step` needs a batch), and optionally
    ``tokenizer`` and ``model_dir`` (for samples and a full fine-tune's result), ``world`` (a launch:
    the objective's module is wrapped in DDP or FSDP2), ``objective`` (default: the recipe's) and
    ``schedule`` (False: no learning-rate schedule, the recipe's peak lr throughout).
    """

    def __init__(self, *, recipe: Recipe, device: torch.device, model: nn.Module, data: TrainingData | None = None,
                 tokenizer=None, model_dir: Path | None = None, world: World = SINGLE,
                 objective: Objective | None = None, schedule: bool = True) -> None:
        self.recipe, self.device, self.model, self.data = recipe, device, model, data
        self.tokenizer, self.model_dir, self.world = tokenizer, model_dir, world
        self.objective = objective or make_objective(recipe.objective, recipe)
        with autocast_for(recipe.precision, device):  # e.g. precomputed reference log-probs, as a step computes them
            self.objective.setup(model, tokenizer, data, device, world)
        module = self.objective.module(model)
        self.trainer = wrap(module, recipe.strategy, world, device) if world.distributed else module
        """What a step runs: the objective's module (model and loss), under DDP or FSDP2 when launched."""
        if world.size > 1:  # the same initial weights everywhere (setup); from here each rank its own dropout masks
            torch.manual_seed((recipe.seed + world.rank) % 2**64)
        self.optimizer = make_optimizer(model, recipe)  # after wrapping: FSDP2 has made the parameters shards
        self.scheduler = make_scheduler(self.optimizer, recipe, data.total_steps) if schedule and data else None
        self.state = TrainState(step=0)
        self.eval_metrics: dict[str, float] = {}
        """What the objective measured at the last :meth:`evaluate` (empty for sft)."""
        self.autocast = autocast_for(recipe.precision, device)
        if is_fsdp(self.trainer):  # the shards (after a forward the root unit's modules hold its gathered weights)
            self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        else:
            self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainer.train()

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, world: World = SINGLE, out_dir: Path | None = None,
                    validation: bool = True, schedule: bool = True) -> "TrainingSession":
        """The session a recipe describes: model, data and (``out_dir`` given) the memory and disk check,
        loaded on every rank (a failure on one stops all). The caller resolves ``recipe``
        (:func:`resolve_device`) and seeds torch's RNG first, as ``train`` and ``compare`` do."""
        device = torch.device(recipe.device)
        model, tokenizer, model_dir, data, objective = agree(
            world, lambda: _load(recipe, device, world, out_dir, validation), "loading the model and data")
        return cls(recipe=recipe, device=device, model=model, data=data, tokenizer=tokenizer, model_dir=model_dir,
                   world=world, objective=objective, schedule=schedule)

    # --- training -----------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return self.data.total_steps

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The batch of the step the session is at (epochs follow each other in the data's order)."""
        step, batches = self.state.step, self.data.batches
        return batches.batch(step // len(batches), step % len(batches))

    def step(self, batch: dict[str, torch.Tensor] | None = None) -> StepResult:
        """One optimizer step on ``batch`` (default: :meth:`next_batch`); raises
        :class:`~loratune.train.step.NonFiniteStep` (the step is not counted) on a NaN/Inf loss,
        gradient norm or weight."""
        result = train_step(self.trainer, self.next_batch() if batch is None else batch, self.optimizer,
                            self.scheduler, self.recipe, self.device, self.autocast, self.trainable, self.world,
                            self.objective, self.model, self.state.step)
        self.state.step += 1
        return result

    def evaluate(self, batches: Batches | None = None) -> float:
        """The objective's mean loss over (``eval_batches`` of) the validation split, or ``batches``; what the
        objective measured on them (e.g. ``rewards/accuracies``) is left in :attr:`eval_metrics`."""
        self.eval_metrics = {}
        return evaluate(self.trainer, self.data.val_batches if batches is None else batches, self.device, self.autocast,
                        self.recipe.eval_batches, self.world, self.objective, self.model, self.eval_metrics)

    def sample(self) -> str:
        """The recipe's sample; every rank of an FSDP2 run takes part (each forward gathers the weights)."""
        return run_on_model(self.trainer, sample_text, self.tokenizer, self.recipe, self.device, is_fsdp(self.trainer))

    def report(self) -> ParamReport:
        """Trainable and total parameters."""
        return parameter_report(self.model)

    # --- saving -------------------------------------------------------------------------------

    @functools.cached_property
    def recipe_fields(self) -> dict:
        """The recipe's result-changing fields, recorded in every checkpoint (once: it reads the data's digests)."""
        return result_fields(self.recipe)

    def save(self, root: Path) -> Path:
        """A resumable checkpoint of the step reached, under ``root`` (every rank takes part)."""
        return save_checkpoint(root, self.model, self.optimizer, self.scheduler, self.state,
                               self.recipe.keep_checkpoints, self.recipe_fields, self.world, self.recipe.strategy)

    def resume(self, root: Path, force: bool = False) -> Path:
        """Continue from the last complete checkpoint under ``root``; returns it. ``force``: even when the
        recipe's result-changing fields differ from the checkpoint's."""
        found = list_checkpoints(root)
        if not found:
            raise ConfigError(f"--resume: no complete checkpoint in {root}")
        self.state = load_checkpoint(found[-1], self.model, self.optimizer, self.scheduler, self.recipe_fields,
                                     force=force, world=self.world)
        return found[-1]

    def save_result(self, out: Path) -> Path | None:
        """The trained adapter (``out/adapter``) or model (``out/model``), written by rank 0 (every rank
        takes part under FSDP2: the weights are gathered); returns what was written (None on other ranks).
        The last thing a run does with its model: under FSDP2 rank 0's model holds the gathered weights
        afterwards, on the CPU."""
        model = self._gathered_model()
        if model is None:
            return None
        recipe = self.recipe
        if recipe.finetune == "lora":
            quant = recipe_quantization(recipe)
            return save_adapter(model, out / "adapter", recipe.lora, base_model=recipe.model,
                                base_quantization=quant.record() if quant else None)
        save_hf_model(model, out / "model", tokenizer_dir=self.model_dir, base_config=read_config(self.model_dir),
                      base_dir=self.model_dir)
        return out / "model"

    def _gathered_model(self) -> nn.Module | None:
        """The model with whole weights on rank 0 (None on the others): itself, or under FSDP2 the same
        modules given the gathered tensors on the CPU (a collective: every rank calls it)."""
        if not is_fsdp(self.trainer):
            return self.model if self.world.main else None  # DDP: every rank holds the same weights; one writes
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # every unit is left sharded by this (its state-dict hook), so the tensors set below stay
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.main:
            return None
        whole: dict[int, nn.Parameter] = {}
        for prefix, module in self.model.named_modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                if id(param) not in whole:  # tied weights stay one tensor
                    if key not in full:
                        raise ConfigError(f"internal: {key} is missing from the gathered weights")
                    whole[id(param)] = nn.Parameter(full[key], requires_grad=param.requires_grad)
                module._parameters[name] = whole[id(param)]
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.cpu()
        return self.model


def _load(recipe: Recipe, device: torch.device, world: World, out_dir: Path | None, validation: bool) -> tuple:
    """The model (on the CPU for FSDP2, which moves each rank's shards to its device), the objective, the data, and the
    resource check (FSDP2 divides the weights, gradients and optimizer state by the world size)."""
    fsdp = world.distributed and recipe.strategy == "fsdp"
    model, tokenizer, model_dir = setup_model(recipe, device, torch.device("cpu") if fsdp else None)
    log.info(f"model: {recipe.model} | finetune: {recipe.finetune} | precision: {recipe.precision}"
             + (f" | {world.size} processes, {recipe.strategy}" if world.distributed else "")
             + (f" | objective: {recipe.objective}" if recipe.objective != "sft" else ""))
    log.info(str(parameter_report(model)))
    objective = make_objective(recipe.objective, recipe)
    data = load_data(recipe, tokenizer, validation, objective.data, world.size)
    if out_dir is not None:  # refuse what won't fit
        check_resources(model, recipe, device, out_dir, shards=world.size if fsdp else 1, objective=objective)
    return model, tokenizer, model_dir, data, objective
