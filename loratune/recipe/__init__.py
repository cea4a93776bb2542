"""The training recipe: one typed dataclass, read from YAML and overridden from the command line.

The YAML file and ``--set key=value`` are two views of :class:`Recipe`; nothing else holds
configuration. Unknown keys are errors that suggest the nearest known key. Beside it:

- ``objectives``: the knobs of the objectives after SFT (the ``preference:`` and ``grpo:`` sections).
- ``checks``: the finite-number and range checks every section's numbers go through.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters.lora import LoRAConfig
from ..bounded_yaml import safe_yaml, yaml_value
from ..data.config import DataConfig
from ..dist.parallel import STRATEGIES
from ..errors import ConfigError
from ..hub.files import sha256_file
from ..models.registry import DEFAULT_MODEL
from ..runtime.seed import check_seed
from .checks import check_number, finite_number
from .objectives import GRPOConfig, PreferenceConfig

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-true")
SCHEDULES = ("constant", "linear", "cosine")
QUANTIZE = ("none", "nf4", "int8", "gguf")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
LR_MAX = 10.0
"""The largest learning rate a recipe may ask for: an AdamW step moves each weight by about lr, so a
larger one is a typo (and past float32's range it would crash the update)."""


@dataclass
class Recipe:
    """Everything a training run needs; see recipes/gpt2_reddit_tifu.yaml for the tutorial's values."""

    model: str = DEFAULT_MODEL
    """Base checkpoint: a local Hugging Face directory or a hub id."""
    out_dir: str = "runs/gpt2-reddit-tifu"
    """Where the adapter, checkpoints, metrics.jsonl and loss.png go."""
    finetune: str = "lora"
    """lora (train only the adapter) or full (train every weight)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """The adapter (ignored for finetune: full)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the text comes from and how it becomes sequences."""
    seq_len: int = 128
    """Tokens per training sequence (at most the model's context)."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    grad_accum: int = 1
    """Micro-batches each step is split into (batch_size / grad_accum sequences at a time): saves
    memory without changing the result."""
    max_steps: int | None = 500
    """Optimizer steps; None = run `epochs` full epochs."""
    epochs: int = 1
    """Epochs when max_steps is None."""
    lr: float = 5e-5
    """Peak learning rate (AdamW), in (0, 10]."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, applied to matrices only (not biases or LayerNorm); >= 0, and
    lr * weight_decay < 1 (each step multiplies the weights by 1 - lr * weight_decay)."""
    adam_eps: float = 1e-6
    """AdamW epsilon, in (0, 1]."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm to this (finite, > 0); None = no clipping."""
    schedule: str = "constant"
    """Learning-rate shape after warm-up: constant, linear (to 0) or cosine (to 0)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to lr."""
    precision: str = "auto"
    """auto (bf16-true where bf16 matmuls are fast: CUDA, CPUs with AMX; else fp32), fp32, bf16-mixed
    (autocast) or bf16-true (weights stored in bf16; LoRA masters fp32, full fine-tuning Kahan-compensated)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward: less activation memory for ~30% more compute."""
    activation_offload: bool = False
    """With activation_checkpointing on CUDA: keep each block's saved input in pinned CPU memory (ignored on CPU)."""
    compile: bool = False
    """torch.compile each transformer block (models/compile.py): fused kernels for a one-time compile; see docs/recipes.md."""
    quantize: str = "none"
    """Store the frozen base in 4-bit NF4 (QLoRA) or int8, or keep a GGUF model's own quantized blocks (gguf:
    the adapter trains against the weights llama.cpp runs): none, nf4, int8 or gguf; only with finetune: lora."""
    double_quant: bool = True
    """Quantize NF4's block scales again (8-bit, block 256): ~0.37 fewer bits per parameter."""
    seed: int = 42
    """Seeds LoRA init, dropout and data order; in [0, 2**64)."""
    device: str = "auto"
    """auto (the first CUDA GPU if there is one, else cpu), cpu, cuda, cuda:N or mps. Under torchrun each
    rank takes cuda:LOCAL_RANK (or the CPU)."""
    strategy: str = "ddp"
    """Under torchrun: ddp (every rank holds the model, gradients all-reduced) or fsdp (FSDP2: weights,
    gradients and optimizer state sharded over the ranks). Ignored in a single process."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps."""
    eval_every: int = 100
    """Validation loss every N steps (0 = only at the end)."""
    eval_batches: int | None = 20
    """Validation batches per evaluation; None = the whole split."""
    save_every: int = 100
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    sample_prompt: str = "today i messed up when"
    """Prompt for the sample generations before and after training ('' = none)."""
    sample_tokens: int = 48
    """New tokens in each sample."""
    objective: str = "sft"
    """The loss a step minimises: sft (causal-LM / completion cross-entropy), the preference objectives dpo, ipo,
    orpo, simpo, kto (data: prompt/chosen/rejected pairs, or KTO's prompt/completion/label), or grpo (data:
    prompts, rewarded completions sampled while training); see train/objective.py."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """dpo, ipo, orpo, simpo, kto: beta and the other knobs."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """grpo: the group, the sampling, the clipped ratio, the KL and the rewards."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go besides metrics.jsonl (always written): tensorboard, wandb (offline unless
    WANDB_MODE says otherwise), mlflow (a file store); each under out_dir, see train/sinks.py."""

    def __post_init__(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise ConfigError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.device, str) or not DEVICE.match(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        self._check_memory_options()
        self._check_counts()
        self._check_optimizer()
        check_seed(self.seed)
        if not isinstance(self.objective, str) or not self.objective:
            raise ConfigError(f"objective must be a name such as 'sft', got {self.objective!r}")
        if isinstance(self.report_to, str):
            self.report_to = [n.strip() for n in self.report_to.split(",") if n.strip()]
        if not isinstance(self.report_to, list) or not all(isinstance(n, str) and n for n in self.report_to):
            raise ConfigError(f"report_to must be a list of sink names (jsonl, tensorboard, wandb, mlflow), "
                              f"got {self.report_to!r}")

    def _check_memory_options(self) -> None:
        for name in ("activation_checkpointing", "activation_offload", "double_quant", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.compile and self.strategy == "fsdp":
            raise ConfigError("compile: true compiles each block, and FSDP2's per-block gathering around compiled "
                              "blocks is not supported here: use strategy: ddp, or compile: false")
        if self.activation_offload and not self.activation_checkpointing:
            raise ConfigError("activation_offload keeps the checkpointed blocks' inputs in CPU memory: set "
                              "activation_checkpointing: true too")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize != "none" and self.finetune != "lora":
            raise ConfigError(f"quantize: {self.quantize} stores the frozen base weights quantized, but finetune: "
                              f"{self.finetune} trains them: use finetune: lora, or quantize: none")
        if self.quantize == "gguf":
            self._check_gguf_base()

    def _check_gguf_base(self) -> None:
        """quantize: gguf keeps the file's blocks as the base: the model must be a GGUF, and the adapter must
        start without moving part of the weight into itself (PiSSA/OLoRA train on a residual)."""
        from ..hub.gguf_file import is_gguf_path
        from ..models.gguf_dir import SOURCE_FILE

        model = str(self.model)
        if not (is_gguf_path(model) or (Path(model).expanduser() / SOURCE_FILE).is_file()):
            raise ConfigError(f"quantize: gguf keeps a GGUF file's own quantization, but model {model!r} is not a "
                              ".gguf file: pass one, or use quantize: nf4 or int8")
        if self.lora.init.startswith(("pissa", "olora")):
            raise ConfigError(f"quantize: gguf keeps the GGUF's blocks as the base, but lora.init {self.lora.init} "
                              "trains on a residual of the weights they hold: use lora.init default or gaussian")

    def _check_counts(self) -> None:
        def positive(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")

        for name in ("seq_len", "batch_size", "grad_accum", "epochs", "keep_checkpoints"):
            positive(name)
        positive("max_steps", allow_none=True)
        positive("eval_batches", allow_none=True)
        for name in ("log_every", "eval_every", "save_every", "warmup_steps", "sample_tokens"):
            positive(name, allow_zero=True)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")

    def _check_optimizer(self) -> None:
        """AdamW's numbers, finite and where an update stays meaningful: one NaN or Inf here turns every
        trained weight NaN at the first step (lora.alpha, lora.dropout and data.val_fraction are checked
        by their own sections)."""
        check_number("lr", self.lr, 0, LR_MAX, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("adam_eps", self.adam_eps, 0, 1, low_open=True)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, 0, low_open=True, what="or null (no clipping)")
        if self.lr * self.weight_decay >= 1:
            raise ConfigError(f"lr * weight_decay must be < 1, got {self.lr:g} * {self.weight_decay:g}: decoupled "
                              "weight decay multiplies every weight by 1 - lr * weight_decay each step")
        betas = self.adam_betas
        if (isinstance(betas, str) or not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(finite_number(b) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        self.adam_betas = (float(betas[0]), float(betas[1]))

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn YAML/CLI text into the field's type (YAML reads '1e-4' as a string, for one).

    One rule for every field: a value is read as the field's type or refused, never taken as
    something else. In particular a boolean where a number belongs (``alpha: yes``) is refused,
    not read as 1 (Python's bools are ints), and a number or a list where text belongs too.
    """
    if value is None:
        return None
    if isinstance(value, bool) and hint in (int, float):
        raise ConfigError(f"{key}: expected a number, got {_kind(value)}")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, options[0], key) if len(options) == 1 else value
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float and not isinstance(value, bool):
            return float(value)
        if hint is str:  # --set text arrives as str; a YAML number, bool, date, list or mapping does not
            if not isinstance(value, str):
                raise ConfigError(f"{key}: expected text, got {_kind(value)} (quote it in YAML)")
            return value
        if origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {_kind(value)}")
            return dict(value)
        if origin is list:
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            return [_coerce(v, typing.get_args(hint)[0], key) for v in items]
        if origin is tuple:
            items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
            return tuple(_coerce(v, typing.get_args(hint)[0], key) for v in items)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float() of a 400-digit integer
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def _kind(value: Any) -> str:
    """How YAML read a value that should have been text: 'the number 5', 'a mapping {...}' (an unquoted {tldr})."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()} (YAML reads yes, no, on, off, true, false as booleans)"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    kinds = {dict: "a mapping", list: "a list"}
    return f"{kinds.get(type(value), 'a ' + type(value).__name__)} {value!r}"


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Make dataclass ``cls`` from a nested dict, checking every key and coercing types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {type(values).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown recipe key {prefix + str(key)!r}{hint}")
        hint_type = hints[key]
        if isinstance(value, _SetValue):
            value = value.text if value.parsed is not None and _is_text(hint_type) else value.parsed
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = build(hint_type, value or {}, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint_type, prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad recipe section {prefix or 'top level'}: {exc}") from None


@dataclass(frozen=True)
class _SetValue:
    """A ``--set`` value as typed and as YAML reads it: text fields take the text (``{tldr}`` is
    a template, not a YAML mapping; ``yes`` is a model name, not True), the others the reading."""

    text: str
    parsed: Any


def _is_text(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)] == [str]
    return hint is str


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` to a nested dict (value parsed as YAML)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    value = yaml_value(text)
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = _SetValue(text, value)


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML (or start from defaults when ``path`` is None) and apply ``--set`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            values = safe_yaml(path.read_text(encoding="utf-8"), str(path))
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: bad dates, !!int 'x', bad UTF-8
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if values is None:  # an empty file, or only comments: all defaults is never what was meant
            raise ConfigError(f"{path} is empty: write the recipe's keys in it (model, data, lr ...), e.g. starting "
                              "from recipes/gpt2_reddit_tifu.yaml")
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of recipe keys")
    for assignment in overrides:
        apply_override(values, assignment)
    return build(Recipe, values)


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain YAML-ready data."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (loads back to an equal Recipe)."""
    return yaml.safe_dump(recipe_dict(recipe), sort_keys=False, allow_unicode=True)


RESULT_FIELDS = ("model", "finetune", "lora", "data", "seq_len", "batch_size", "lr", "weight_decay", "adam_eps",
                 "adam_betas", "max_grad_norm", "schedule", "warmup_steps", "precision", "seed", "quantize",
                 "double_quant", "objective", "preference", "grpo")
"""Recipe fields that change what a run computes (grad_accum does not: it splits the same batch, nor does
activation_checkpointing: it recomputes the same values, nor compile: the same values within rounding)."""


def result_fields(recipe: Recipe) -> dict[str, Any]:
    """The recipe's result-changing values, flattened ('lora.r': 4, ...), plus what makes them depend
    on the run's length (max_steps, epochs) under a decaying schedule, and the local data files' digests."""
    values = recipe_dict(recipe)
    names = list(RESULT_FIELDS) + (["max_steps", "epochs"] if recipe.schedule != "constant" else [])
    flat: dict[str, Any] = {}
    for name in names:
        value = values[name]
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            flat[name] = value
    for key in ("source", "val_source"):
        path = Path(str(getattr(recipe.data, key) or "")).expanduser()
        if getattr(recipe.data, key) and path.is_file():
            flat[f"data.{key}.sha256"] = sha256_file(path)
    return flat


def default_result_fields() -> dict[str, Any]:
    """result_fields() of the default recipe: what a field absent from an older checkpoint's record meant."""
    return result_fields(Recipe())


def fingerprint(fields: dict[str, Any]) -> str:
    """A short hash of result_fields()."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
