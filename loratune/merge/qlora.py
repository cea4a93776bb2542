"""Merging a QLoRA adapter: into the base it was trained against, and saying what that costs.

A QLoRA adapter learned to correct the *4-bit* base, not the original 16-bit weights. Merged
into the original weights it adds its update to weights that differ from the ones it saw by
the quantization error, which shifts every output (QLoRA users' classic quality loss). So the
default is to quantize the original weights exactly as training did (the same NF4 settings,
deterministic), dequantize them to float32, merge there and export in 16/32-bit. Either way the
command measures the logits of the merged model against the adapted 4-bit model on a fixed
probe batch and prints the difference; merging into the original weights is allowed as an
explicit choice, with a warning that carries that number.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..adapters.lora import lora_layers, merge_lora
from ..adapters.peft_config import EXTRA_NAME
from ..adapters.update import WHOLE, LoRAUpdate
from ..errors import ConfigError
from ..hub.files import read_json
from ..models import load_model
from ..quant.model import QuantConfig, dequantize_model, quantize_model
from .plan import MergePlan

log = logging.getLogger("loratune")

PROBE_TOKENS = 64


def trained_quantization(adapter_dirs: list[Path]) -> QuantConfig | None:
    """The quantized base the adapters were trained against (from loratune's metadata), or None.
    Adapters trained against different bases cannot be merged together into one of them."""
    found = set()
    for d in adapter_dirs:
        record = _extra(d).get("base_quantization")
        found.add(None if not record else QuantConfig.from_record(record))
    if len(found) > 1:
        raise ConfigError("these adapters were trained against different bases (quantized and not, or with other "
                          "quantization settings): merge them one at a time")
    return found.pop() if found else None


def check_gguf_base(model_dir: Path, into: str) -> None:
    """An adapter trained with ``quantize: gguf`` saw the GGUF's blocks decoded, which is what that GGUF loads
    as: it merges there with no re-quantization. Into another model only when asked (``into`` original)."""
    from ..models.gguf_dir import is_gguf_dir

    if into != "original" and not is_gguf_dir(model_dir):
        raise ConfigError(f"the adapter was trained against a GGUF file's own quantization (quantize: gguf), but "
                          f"{model_dir} is not a GGUF: pass that .gguf as --model, or --into original to merge into "
                          "these weights anyway")


def residual_start(adapter_dirs: list[Path]) -> bool:
    """Whether an adapter was trained from a PiSSA/OLoRA start (its base was the residual W - s B0 A0)."""
    found = [bool(_extra(d).get("residual_start")) for d in adapter_dirs]
    if any(found) and len(found) > 1:
        raise ConfigError("a PiSSA/OLoRA QLoRA adapter was trained on its own residual base: merge it alone")
    return any(found)


def _extra(adapter_dir: Path) -> dict:
    extra = read_json(adapter_dir / EXTRA_NAME, "loratune metadata") if (adapter_dir / EXTRA_NAME).is_file() else {}
    return extra if isinstance(extra, dict) else {}


@torch.no_grad()
def to_residual(model: nn.Module) -> None:
    """Undo the save-time conversion of a PiSSA/OLoRA adapter: it was saved as [A; A0], [B, -B0] (rank 2r)
    for the original base, but trained on the residual W - s B0 A0, which is what QLoRA quantized. Put the
    residual back as the base and keep the trained half, so the base is quantized as training saw it."""
    for _, layer in lora_layers(model):
        for name in layer.present():
            u = layer.lora[name]
            a, b = u.stacked_A().float(), u.stacked_B(scaled=False).float()
            h = a.shape[0] // 2
            layer._set_weight(layer.base_weight() + u.scale * (b[:, h:] @ a[h:]))  # W - s B0 A0
            alpha = u.scale * (math.sqrt(h) if u.rslora else h)  # the same scale at rank h
            trained = LoRAUpdate(u.in_features, u.out_features, h, alpha, rslora=u.rslora, device=a.device)
            trained.lora_A[WHOLE].copy_(a[:h])
            trained.lora_B[WHOLE].copy_(b[:, :h])
            layer.lora[name] = trained


def probe_ids(vocab_size: int, device: torch.device) -> torch.Tensor:
    """A fixed batch of token ids for comparing two models' logits (seeded, so every run sees the same)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, PROBE_TOKENS), generator=gen).to(device)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(ids).float()


def logit_gap(actual: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(largest absolute logit difference, that over the reference's largest |logit|)."""
    gap = float((actual - reference).abs().max())
    return gap, gap / max(float(reference.abs().max()), 1e-12)


def merge_qlora(plan: MergePlan, model_dir: Path, quant: QuantConfig, into: str, device: torch.device,
                out_dtype: torch.dtype | None = None) -> tuple[nn.Module, int]:
    """Merge a QLoRA adapter (``into`` quantized: the dequantized 4-bit base, or original: the
    checkpoint's own weights) in float32; returns (merged model, layers merged) and logs the logit
    difference between the adapted 4-bit model and the export (its weights rounded to ``out_dtype``)."""
    model, _ = load_model(model_dir, dtype=torch.float32, device=device)
    plan.load(model)
    if residual_start(plan.adapter_dirs):
        to_residual(model)
    quantize_model(model, quant)
    ids = probe_ids(model.config.vocab_size, device)
    reference = _logits(model, ids)  # what training saw: the 4-bit base plus the adapter
    if into == "quantized":
        dequantize_model(model, torch.float32)
    else:
        del model
        model, _ = load_model(model_dir, dtype=torch.float32, device=device)
        plan.load(model)
    merged = merge_lora(model)
    if out_dtype is not None and out_dtype != torch.float32:
        with torch.no_grad():  # what the export will store (it casts anyway)
            for p in model.parameters():
                p.copy_(p.to(out_dtype).float())
    gap, rel = logit_gap(_logits(model, ids), reference)
    where = "the dequantized 4-bit base it was trained against" if into == "quantized" else \
        "the original weights"
    stored = "" if out_dtype in (None, torch.float32) else f", stored in {str(out_dtype).removeprefix('torch.')}"
    message = (f"QLoRA merge into {where}{stored}: logits differ from the adapted 4-bit model by at most {gap:.3g} "
               f"({100 * rel:.3g}% of the largest logit) on a {PROBE_TOKENS}-token probe")
    if into == "original":
        log.warning(message + ". The adapter was trained against the NF4-quantized base, not these weights; "
                    "merge with --into quantized (the default) to keep what it learned")
    else:
        print(message)
    return model, merged
