"""A merged model, start to end: the adapters folded in (into the base they were trained against) and the
result written as a Hugging Face model directory that records them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub.export import save_hf_model, with_merged_adapter
from ..models import load_model
from ..runtime.fsutil import full_disk_is_a_resource_error
from .plan import MergePlan
from .qlora import check_gguf_base, merge_qlora, trained_quantization


def merged_model(plan: MergePlan, model_dir: Path, into: str, device: torch.device, dtype: torch.dtype | None,
                 out_dtype: torch.dtype | None) -> tuple[nn.Module, int]:
    """(the model with ``plan``'s adapters merged, layers merged). A QLoRA adapter (its metadata names the
    quantized base it was trained against) merges into that base dequantized (``into`` auto or quantized)
    or into the original weights (``into`` original, warned), in float32 (:func:`~.qlora.merge_qlora`);
    others merge into the model loaded in ``dtype``, as does one trained on a GGUF's own blocks (``quantize:
    gguf``): the GGUF loaded is those blocks decoded."""
    quant = trained_quantization(plan.adapter_dirs)
    if quant is not None and quant.kind == "gguf":
        check_gguf_base(model_dir, into)
        quant = None
    if quant is None:
        model, _ = load_model(model_dir, dtype=dtype, device=device)
        return model, plan.apply(model)
    return merge_qlora(plan, model_dir, quant, "quantized" if into == "auto" else into, device, out_dtype)


def save_merged(model: nn.Module, out: Path, model_dir: Path, base_config: dict[str, Any],
                records: list[dict[str, Any]], out_dtype: torch.dtype | None, max_shard_size: str | int) -> None:
    """Write the merged model to ``out`` (complete or absent), its config.json listing ``records``
    (:func:`~.records.merge_record`) after the merges the base already lists."""
    config = base_config
    for record in records:
        config = with_merged_adapter(config, record)
    with full_disk_is_a_resource_error(f"the merged model to {out}", "the unfinished write was removed. Free some "
                                       "space, or choose an --out on another disk, and run the command again"):
        save_hf_model(model, out, tokenizer_dir=model_dir, dtype=out_dtype, max_shard_size=max_shard_size,
                      base_config=config, base_dir=model_dir)
