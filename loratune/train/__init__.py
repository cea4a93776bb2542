"""Training: one loop (``loop``) around one session (``session``: model, objective, optimizer, schedule,
precision and data, set up once) and its step (``step``), with the objectives (``objective``: the seam
and sft; ``preference``: DPO, IPO, ORPO, SimPO; ``kto``; ``grpo`` with its ``rollout`` and ``rewards``; ``logps``: the
log-probabilities they score), the fused loss (``loss``), AdamW and schedules (``optim``), precision (``precision``), resumable snapshots
(``checkpoint``), resource guards (``guards``), metrics and plots (``metrics``), the metric sinks
(``sinks``: metrics.jsonl, TensorBoard, W&B, MLflow), the output directory (``run_dir``), samples
(``samples``), stop requests (``stop``), the allocator choice (``allocator``) and the LoRA-vs-full
comparison (``compare``)."""

from . import grpo, kto, preference  # noqa: F401  (each registers its objectives)
from .loop import TrainResult, train
from .session import TrainingData, TrainingSession, resolve_device, setup_model
from .step import TrainingStopped, evaluate, forward_backward, train_step

__all__ = ["TrainResult", "TrainingData", "TrainingSession", "TrainingStopped", "evaluate", "forward_backward",
           "resolve_device", "setup_model", "train", "train_step"]
