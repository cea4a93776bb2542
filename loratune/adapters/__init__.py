"""Adapters: the LoRA layer and everything that adds, saves, combines or serves its updates.

Modules:

- ``lora``: :class:`LoRALinear` (a frozen base plus one update per named adapter), merge/unmerge,
  :class:`LoRAConfig`; ``update``: :class:`~.update.LoRAUpdate`, one adapter's A and B on one layer and
  the variant seam; ``variants``: the variants by name; ``dora``: DoRA, the one variant besides LoRA.
- ``init``: Gaussian, PiSSA and OLoRA starts, applied to a model's layers, and the conversion back
  to a plain adapter.
- ``targets``: target names -> modules, :func:`inject_lora`; ``trainable``: the one rule for what trains.
- ``named``: several adapters by name (switch, delete, combine); ``combine``: PEFT's
  ``add_weighted_adapter`` combinations (``loratune merge`` is in :mod:`loratune.merge`).
- ``peft_format``, ``peft_config``: the PEFT file format both ways.
- ``gguf_adapter``: a llama.cpp LoRA adapter GGUF read as our LoRA weights (``--adapter x.gguf``).
- ``rows``: per-row adapters for serving: the banks, held beside the model, not in its layers.

Adding an adapter variant (a method that changes what LoRA computes, as DoRA does): write one file
here with a subclass of :class:`~.update.LoRAUpdate` that overrides what the method changes (the
seam's methods in ``update.py``: ``added`` for forward, ``merged_weight``/``unmerged_weight``,
``finite``, ``start`` for state set from the base weight, ``trainable``, ``bank_scale`` for serving,
``peft_extra``/``load_peft_extra`` and ``peft_flag`` for the PEFT format, ``base_fingerprint``/``base_fit``
if it only fits the base it was trained on, ``combine_refusal`` if it cannot be combined), add it to
:data:`~.variants.VARIANTS`, and give :class:`LoRAConfig` a boolean field named as its ``peft_flag``
so a recipe can choose it. :mod:`.dora` is the worked example; the parity tests to copy are
``tests/adapters/test_dora.py`` (against PEFT, both ways, merge, serving in ``test_rows.py``).
"""

from .lora import LoRAConfig, LoRALinear, adapters_disabled, lora_layers, merge_lora, unmerge_lora
from .named import active_adapters, adapter_names, combine_adapters, delete_adapter, set_active_adapters
from .peft_format import load_adapter, save_adapter
from .targets import inject_lora
from .trainable import parameter_report, set_trainable

__all__ = ["LoRAConfig", "LoRALinear", "active_adapters", "adapter_names", "adapters_disabled", "combine_adapters",
           "delete_adapter", "inject_lora", "load_adapter", "lora_layers", "merge_lora", "parameter_report",
           "save_adapter", "set_active_adapters", "set_trainable", "unmerge_lora"]
