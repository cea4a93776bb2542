"""Adapters: the LoRA layer and its merge (``lora``), target names -> modules (``targets``), the one
rule for what trains (``trainable``), and the PEFT file format both ways (``peft_format``,
``peft_config``)."""

from .lora import LoRAConfig, LoRALinear, adapters_disabled, lora_layers, merge_lora, unmerge_lora
from .peft_format import load_adapter, save_adapter
from .targets import inject_lora
from .trainable import parameter_report, set_trainable

__all__ = ["LoRAConfig", "LoRALinear", "adapters_disabled", "inject_lora", "load_adapter", "lora_layers",
           "merge_lora", "parameter_report", "save_adapter", "set_trainable", "unmerge_lora"]
