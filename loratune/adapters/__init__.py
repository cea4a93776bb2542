"""Adapters: the LoRA layer and its merge (``lora``, one ``update`` per named adapter, ``dora``),
target names -> modules (``targets``), starts (``init``), several adapters by name and their
combinations (``named``, ``combine``), the one rule for what trains (``trainable``), and the
PEFT file format both ways (``peft_format``, ``peft_config``)."""

from .lora import LoRAConfig, LoRALinear, adapters_disabled, lora_layers, merge_lora, unmerge_lora
from .named import active_adapters, adapter_names, combine_adapters, delete_adapter, set_active_adapters
from .peft_format import load_adapter, save_adapter
from .targets import inject_lora
from .trainable import parameter_report, set_trainable

__all__ = ["LoRAConfig", "LoRALinear", "active_adapters", "adapter_names", "adapters_disabled", "combine_adapters",
           "delete_adapter", "inject_lora", "load_adapter", "lora_layers", "merge_lora", "parameter_report",
           "save_adapter", "set_active_adapters", "set_trainable", "unmerge_lora"]
