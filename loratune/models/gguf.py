"""GGUF checkpoints as our families: the config from the metadata, and the tensors under their
transformers names, as llama.cpp's ``convert_hf_to_gguf.py`` wrote them and undone here.

What the converter changes, each undone per family (the family's :class:`GGUFFacts`, in its own
file): tensor names (``blk.N.attn_q.weight``; gguf-py's ``TensorNameMap`` holds the table), the
row order of q and k in the Llama architecture (``permute``: llama.cpp's rope rotates adjacent
pairs, transformers' rotates halves), and Gemma's RMSNorm weights (stored as ``1 + w``). The
config is rebuilt from the ``<arch>.*`` keys, with the family's defaults for what llama.cpp does
not store (Gemma 3's local rope base, its sliding-window pattern), as transformers'
``from_pretrained(..., gguf_file=)`` rebuilds it.

The writer's side (export) uses the same facts and names: :func:`gguf_name` and :func:`permute`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError
from ..hub.gguf_file import GGUFBlocks, GGUFFile, gguf_module


@dataclass(frozen=True)
class GGUFFacts:
    """How llama.cpp stores one of our families in GGUF."""

    arch: str
    """``general.architecture`` (llama.cpp's name: 'llama' for Llama, Mistral and SmolLM2)."""
    permute_qk: bool = False
    """q and k rows were permuted by the converter (its LlamaModel), as :func:`permute` does."""
    norm_shift: float = 0.0
    """Added to every RMSNorm weight by the converter (Gemma: 1, its norms compute x * (1 + w))."""
    name_hint: str | None = None
    """Several families share ``arch``: this one is meant where ``general.name`` contains the hint."""
    config: Callable[[GGUFFile, dict[str, Any]], dict[str, Any]] = lambda f, hf: hf
    """(file, the common config.json dict) -> the family's config.json dict (its own keys added)."""
    metadata: Callable[[dict[str, Any]], dict[str, Any]] = lambda hf: {}
    """config.json dict -> the family's own ``<arch>.*`` keys, for export."""
    extra_tensors: Callable[[dict[str, Any]], dict[str, torch.Tensor]] = field(default=lambda hf: {})
    """config.json dict -> tensors llama.cpp wants beside the weights (rope_freqs), for export."""


def _arch_enum(arch: str):
    gguf = gguf_module()
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise CheckpointError(f"gguf-py does not know architecture {arch!r}")


def name_map(arch: str, n_layers: int, hf_names: list[str]) -> dict[str, str]:
    """transformers name -> GGUF name for each of ``hf_names`` (gguf-py's table, as the converter uses it)."""
    table = gguf_module().get_tensor_name_map(_arch_enum(arch), n_layers)
    out = {}
    for name in hf_names:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise CheckpointError(f"no GGUF name for tensor {name} in llama.cpp's {arch} architecture")
        out[name] = mapped
    return out


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row permutation (halves -> interleaved pairs), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute` (also on the rows of raw quantized blocks: each row is whole)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads_for(hf_name: str, hf: dict[str, Any]) -> int | None:
    """The head count the permutation of this tensor used (q: query heads, k: kv heads), else None."""
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return hf["num_attention_heads"]
    if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return hf.get("num_key_value_heads") or hf["num_attention_heads"]
    return None


def is_norm(hf_name: str) -> bool:
    return hf_name.endswith("norm.weight")


def from_gguf(facts: GGUFFacts, hf: dict[str, Any], hf_name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor as the file holds it -> as transformers holds it (un-permuted, norm shift removed)."""
    heads = _heads_for(hf_name, hf) if facts.permute_qk else None
    if heads is not None:
        t = unpermute(t, heads)
    if facts.norm_shift and is_norm(hf_name):
        t = t - facts.norm_shift
    return t


def to_gguf(facts: GGUFFacts, hf: dict[str, Any], hf_name: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`from_gguf`: a transformers tensor as llama.cpp's converter writes it."""
    heads = _heads_for(hf_name, hf) if facts.permute_qk else None
    if heads is not None:
        t = permute(t, heads)
    if facts.norm_shift and is_norm(hf_name):
        t = t + facts.norm_shift
    return t


def _int(file: GGUFFile, key: str, required: bool = True) -> int | None:
    value = file.get(key)
    if isinstance(value, list):  # per-layer arrays (head_count_kv in some files): one value for all layers only
        if value and all(v == value[0] for v in value):
            value = value[0]
        else:
            raise CheckpointError(f"{file.path}: {key} differs between layers ({value[:8]}...), which loratune's "
                                  "families do not have")
    if value is None:
        if required:
            raise CheckpointError(f"{file.path} has no {key}: the file is incomplete")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{file.path}: {key} must be a positive integer, got {value!r}")
    return value


def common_config(file: GGUFFile, model_type: str) -> dict[str, Any]:
    """The config.json keys every family's GGUF stores the same way (llama.cpp's ``<arch>.*`` keys)."""
    arch = file.architecture
    heads = _int(file, f"{arch}.attention.head_count")
    hidden = _int(file, f"{arch}.embedding_length")
    tokens = file.get("tokenizer.ggml.tokens")
    vocab = _int(file, f"{arch}.vocab_size", required=False) or (len(tokens) if isinstance(tokens, list) else None)
    embed = file.tensors.get("token_embd.weight")
    if embed is not None:
        vocab = embed.shape[0]
    if vocab is None:
        raise CheckpointError(f"{file.path} has neither {arch}.vocab_size nor a token embedding")
    hf: dict[str, Any] = {
        "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": _int(file, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _int(file, f"{arch}.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": _int(file, f"{arch}.attention.head_count_kv", required=False) or heads,
        "max_position_embeddings": _int(file, f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in file.tensors,
    }
    head_dim = _int(file, f"{arch}.attention.key_length", required=False)
    hf["head_dim"] = head_dim or hidden // heads
    for key, name in (("rms_norm_eps", "attention.layer_norm_rms_epsilon"), ("rope_theta", "rope.freq_base")):
        value = file.get(f"{arch}.{name}")
        if value is not None:
            hf[key] = float(value)
    scaling = file.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(file.get(f"{arch}.rope.scaling.factor"))}
    elif scaling == "yarn":
        hf["rope_scaling"] = {"rope_type": "yarn", "factor": float(file.get(f"{arch}.rope.scaling.factor")),
                              "original_max_position_embeddings":
                                  _int(file, f"{arch}.rope.scaling.original_context_length")}
    elif scaling not in (None, "none"):
        raise CheckpointError(f"{file.path}: rope scaling {scaling!r} is not one loratune reads from GGUF")
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = file.get(f"tokenizer.ggml.{name}")
        if isinstance(value, int) and not isinstance(value, bool):
            hf[key] = value
    return hf


def config_metadata(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The common ``<arch>.*`` keys of a config.json dict (the inverse of :func:`common_config`), for export."""
    meta = {
        f"{arch}.context_length": hf["max_position_embeddings"], f"{arch}.embedding_length": hf["hidden_size"],
        f"{arch}.block_count": hf["num_hidden_layers"], f"{arch}.feed_forward_length": hf["intermediate_size"],
        f"{arch}.attention.head_count": hf["num_attention_heads"],
        f"{arch}.attention.head_count_kv": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        f"{arch}.vocab_size": hf["vocab_size"],
    }
    if hf.get("rope_theta") is not None:
        meta[f"{arch}.rope.freq_base"] = float(hf["rope_theta"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        meta[f"{arch}.attention.key_length"] = head_dim
        meta[f"{arch}.attention.value_length"] = head_dim
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        meta.update({f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": float(scaling["factor"])})
    elif kind == "yarn":
        meta.update({f"{arch}.rope.scaling.type": "yarn", f"{arch}.rope.scaling.factor": float(scaling["factor"]),
                     f"{arch}.rope.scaling.original_context_length": scaling["original_max_position_embeddings"]})
    return meta


def hf_names_of(family, config) -> list[str]:
    """The transformers tensor names a model of ``config`` holds (a tied head's lm_head left out)."""
    with torch.device("meta"):
        model = family.build(config)
    names = list(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        names = [n for n in names if n != "lm_head.weight"]
    return names


def _gguf_names(file: GGUFFile, family, config) -> dict[str, str]:
    """GGUF name -> transformers name for every weight the model needs; a missing one is refused by name."""
    facts = family.gguf
    hf_names = hf_names_of(family, config)
    mapping = {g: h for h, g in name_map(facts.arch, config.num_hidden_layers, hf_names).items()}
    missing = [g for g in mapping if g not in file.tensors]
    if missing:
        raise CheckpointError(f"{file.path} lacks tensor {missing[0]} (and {len(missing) - 1} more) that a "
                              f"{family.display_name} of this config needs: the file is incomplete or not this "
                              "architecture")
    return mapping


def gguf_state_dict(file: GGUFFile, family, config, hf: dict[str, Any],
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names, dequantized (float32 unless ``dtype``), tensor by tensor."""
    state = {}
    for gguf_name, hf_name in _gguf_names(file, family, config).items():
        t = from_gguf(family.gguf, hf, hf_name, file.tensors[gguf_name].dequantize(torch.float32))
        state[hf_name] = t if dtype is None else t.to(dtype)
    return state


def gguf_blocks(file: GGUFFile, family, config, hf: dict[str, Any]) -> dict[str, GGUFBlocks]:
    """The quantized 2-D weights as their blocks, under transformers' names, q/k rows un-permuted;
    float tensors (norms, F32/F16 weights) are left out: those load as floats."""
    out = {}
    for gguf_name, hf_name in _gguf_names(file, family, config).items():
        tensor = file.tensors[gguf_name]
        if len(tensor.shape) != 2 or tensor.qtype in ("F32", "F16", "BF16"):
            continue
        blocks = tensor.blocks()
        heads = _heads_for(hf_name, hf) if family.gguf.permute_qk else None
        if heads is not None:
            blocks = GGUFBlocks(unpermute(blocks.data, heads).contiguous(), blocks.qtype, blocks.shape)
        out[hf_name] = blocks
    return out
