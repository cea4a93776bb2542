"""Training: one loop (``loop``) around one step (``step``) for LoRA and full fine-tuning, with the
fused loss (``loss``), AdamW and schedules (``optim``), precision (``precision``), resumable
snapshots (``checkpoint``), resource guards (``guards``), metrics and plots (``metrics``), and the
LoRA-vs-full comparison (``compare``)."""

from .loop import TrainResult, resolve_device, setup_model, train
from .step import TrainingStopped, evaluate, forward_backward, train_step

__all__ = ["TrainResult", "TrainingStopped", "evaluate", "forward_backward", "resolve_device", "setup_model", "train",
           "train_step"]
