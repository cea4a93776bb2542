"""Merging: adapters folded into the base weights for ``loratune merge`` (the one home of merging
beyond a layer's own :meth:`~loratune.adapters.lora.LoRALinear.merge`).

- ``plan``: what is folded in: one adapter, or several combined with weights first (:class:`MergePlan`).
- ``qlora``: a QLoRA adapter merged into the base it was trained against, and what that costs in logits.
- ``records``: what config.json records about merged adapters, and the repeats it lets us refuse.
- ``model``: the merged model, start to end (the plan applied, QLoRA or not) and its directory written.
"""

from .model import merged_model, save_merged
from .plan import MergePlan, adapter_names_for
from .qlora import merge_qlora, trained_quantization
from .records import merge_record, refuse_repeat, refuse_twice

__all__ = ["MergePlan", "adapter_names_for", "merge_qlora", "merge_record", "merged_model", "refuse_repeat",
           "refuse_twice", "save_merged", "trained_quantization"]
