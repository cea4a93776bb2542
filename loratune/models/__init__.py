"""Model families. Each lives in its own file with its :class:`~loratune.models.spec.FamilySpec`;
:mod:`loratune.models.registry` maps config.json's ``model_type`` to it, and :func:`load_model`
loads any registered family.

- ``spec``: :class:`FamilySpec`, what the rest of loratune may know about a family.
- ``registry``: model_type -> spec; adding a family is one line here.
- ``gpt2``: GPT-2 and its spec.
- ``decoder``: the Llama-style decoder the other families share.
- ``decoder_config``: its typed config, one named field per difference between families.
- ``decoder_family``: what a Llama-style family's spec shares (weight loading, aliases, memory).
- ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``phi3``, ``gemma3``, ``smollm3``: each family's config
  reader and writer, name and presets.
- ``rope``: rotary embeddings with the published scalings.
- ``attention``: SDPA, or batched matmuls where those train faster.
- ``tiled_attention``: causal attention over query blocks for CPU training (matmul-bound, no T x T kept).
- ``kv_cache``: the preallocated KV cache.
- ``recompute``: activation recompute of the blocks (``activation_checkpointing``), and CUDA offload of their inputs.
- ``compile``: regional ``torch.compile`` of the blocks (the recipe's ``compile``); the KV-cache path stays eager.
- ``weight_map``: a transformers state dict onto our parameters, every key and shape checked.
- ``gguf``: GGUF checkpoints as our families (config from metadata, tensor names, q/k permutation, norm shift).
- ``gguf_dir``: a GGUF file as a model directory (config and tokenizer files in loratune's cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..hub.files import open_state_dict, read_config
from ..runtime.finite import check_finite
from .gguf_dir import is_gguf_dir, read_gguf_weights, resolve_model
from .gpt2 import GPT2, GPT2Config
from .kv_cache import KVCache
from .registry import family_for_config
from .weight_map import LinearHook

log = logging.getLogger(__name__)

__all__ = ["GPT2", "GPT2Config", "KVCache", "check_tokenizer_fits", "load_model", "resolve_model"]


def load_model(name_or_path: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", linear_hook: LinearHook | None = None) -> tuple[nn.Module, Path]:
    """Load a Hugging Face checkpoint (local directory or hub id) or a GGUF file of a supported family as
    our model (a GGUF is dequantized; see :mod:`.gguf_dir`).

    Returns the model (in eval mode) and the local directory it came from (for the tokenizer).
    Weights holding NaN/Inf (a corrupt file, or values beyond ``dtype``'s range) are a
    :class:`CheckpointError` naming the first such tensor, not garbage output later.

    The tensors are read one at a time (safetensors and GGUF files), so with ``linear_hook`` (QLoRA's
    quantize-while-loading, :mod:`loratune.quant.load`) each projection's float weight is checked,
    handed to the hook and freed before the next is read (:mod:`.weight_map`); without one the model
    costs about its size in ``dtype``.
    """
    model_dir = resolve_model(name_or_path)
    hf_config = read_config(model_dir)
    family = family_for_config(hf_config)
    config = family.config_from_hf(hf_config)
    if is_gguf_dir(model_dir):
        state = read_gguf_weights(model_dir, family, config, dtype)
    else:
        state = open_state_dict(model_dir, dtype)  # read tensor by tensor as they are mapped
    if not state:
        raise CheckpointError(f"the weights in {model_dir} are empty")
    where = f"model weights in {model_dir}"
    advice = ("its values overflow float16, or the file is corrupt: load it in float32 or bfloat16"
              if dtype == torch.float16 else "the file is corrupt: download or export it again")
    hook = None
    if linear_hook is not None:
        def hook(name: str, read, shape: tuple[int, ...]):
            def checked() -> torch.Tensor:
                weight = read()
                try:  # before the hook quantizes it away
                    check_finite({name: weight}, where, advice)
                except CheckpointError as exc:
                    raise _NamesItsFile(str(exc)) from None
                return weight
            return linear_hook(name, checked, shape)
    try:
        model = family.from_hf_state_dict(config, state, dtype, **({"linear_hook": hook} if hook else {}))
    except _NamesItsFile as exc:
        raise CheckpointError(str(exc)) from None
    except CheckpointError as exc:
        raise CheckpointError(f"{model_dir}: {exc}") from None
    model = model.to(device).eval()
    check_finite(dict(model.named_parameters()), where, advice)
    return model, model_dir


class _NamesItsFile(CheckpointError):
    """A load error whose message already names the model directory."""


def check_tokenizer_fits(model: nn.Module, tokenizer) -> None:
    """Refuse a tokenizer whose vocabulary the model's embedding cannot hold.

    Such an id crashes the embedding lookup (or, on a GPU, an assertion in the middle of a run);
    a tokenizer smaller than the embedding is fine (padded vocabularies). Added tokens past the
    embedding (Gemma 3's ``<image_soft_token>`` for its text-only models) are allowed, as
    transformers allows them; text that produces one is refused when encoded.
    """
    rows = model.config.vocab_size
    if tokenizer.base_vocab_size > rows:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens, but the model's embedding has "
                              f"{rows} rows (its vocab_size): ids >= {rows} would crash the embedding; use the tokenizer "
                              "files that belong to this model")
    if tokenizer.vocab_size > rows:
        extra = tokenizer.limit_ids(rows)
        log.info(f"the tokenizer's added tokens {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} have no "
                 "embedding row in this model; text containing them will be refused")
