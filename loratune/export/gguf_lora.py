"""A LoRA adapter as a llama.cpp adapter GGUF, as llama.cpp's ``convert_lora_to_gguf.py`` writes it.

What llama.cpp reads (``llama_adapter_lora_init``): metadata ``general.type=adapter``,
``adapter.type=lora``, ``adapter.lora.alpha`` (float32) and the base's ``general.architecture``
(refused when it differs from the model's); tensors ``<base GGUF name>.lora_a`` (r, in) and
``.lora_b`` (out, r) in torch order, exactly as PEFT stores ``lora_A``/``lora_B``, each pair
checked against the base tensor of that name. It computes ``W x + (alpha / r) B (A x)`` with
``r`` read from each pair (the rank of lora_b) and one ``alpha`` for the file.

What the converter changes, done here the same way:

- names: the base model's tensor names (``blk.N.attn_q.weight``: gguf-py's table, as for the
  whole model, :func:`~loratune.models.gguf.name_map`);
- the q/k row permutation of the Llama architecture (llama.cpp's rope rotates adjacent pairs):
  applied to B of q and k (rows are outputs), as the converter's ``LlamaModel.modify_tensors``
  permutes the lora_b of a q/k pair; A is untouched;
- fused projections stay fused: Phi-3's ``qkv_proj`` is llama.cpp's one ``attn_qkv`` tensor, and
  our PEFT adapter on its q and v slices is already the exactly equivalent whole-``qkv_proj`` pair
  (B zero on k's rows), so it goes out as that pair.

The one ``alpha`` per file is where PEFT adapters can say more: a rank or alpha that differs per
module (``rank_pattern``/``alpha_pattern``), or rsLoRA's ``alpha / sqrt(r)``. llama.cpp already
reads each pair's own rank, so the scale it applies to module m is ``alpha / r_m``; where the
adapter's true scale ``s_m`` differs, B is multiplied by ``s_m / (alpha / r_m)``. That fold is
exact in real arithmetic (the update is ``s_m B A`` either way; in float32 the product is rounded
once, far below the output type's own rounding), so these adapters are written, not refused.

Refused with the reason (nothing written): DoRA (its magnitude vectors have no place in the file),
trained biases (``bias`` other than none) and ``modules_to_save`` (whole modules, not pairs: merge
instead), a LoRA on the token embeddings, a LoRA on a tied output head (llama.cpp runs a tied
model's head as ``token_embd``, so no ``output.weight`` exists for the pair to name), and a base
whose family llama.cpp does not run (no GGUF facts: GPT-2 here).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..adapters.peft_config import is_targeted, pattern_value
from ..adapters.peft_format import CONFIG_NAME, read_adapter, resolve_adapter_dir
from ..adapters.targets import HEAD_NAMES, features, targetable
from ..errors import CheckpointError, ConfigError
from ..hub.files import read_json
from ..hub.gguf_file import gguf_module
from ..hub.gguf_write import write_gguf
from ..models.gguf import hf_names_of, name_map, to_gguf
from ..models.gguf_dir import resolve_model
from ..models.registry import find_family

log = logging.getLogger("loratune")

OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
"""``--outtype`` -> GGUF tensor type: what convert_lora_to_gguf.py offers (1-D tensors stay F32 and
rows that are not whole Q8_0 blocks fall back to F16, as there)."""
_MERGE = "merge it into the base instead (loratune export --merge) for a whole-model GGUF"
_EMBEDDINGS = ("embed_tokens",)


def write_lora_gguf(model_dir: str | Path, adapter_dir: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """Write the PEFT-format adapter ``adapter_dir`` for the base ``model_dir`` (a model directory, hub id
    or GGUF file) as a llama.cpp LoRA adapter GGUF at ``out`` (complete or absent); returns ``out``.

    Per-module ranks and alphas and rsLoRA are folded into B exactly (see the module docstring); what a
    LoRA GGUF cannot hold is a CheckpointError naming it, and nothing is written.
    """
    qtype = OUTTYPES.get(str(outtype).lower())
    if qtype is None:
        raise ConfigError(f"--outtype {outtype!r} for a LoRA adapter GGUF: choose one of {', '.join(OUTTYPES)} "
                          "(what llama.cpp's convert_lora_to_gguf.py writes)")
    base_dir = resolve_model(model_dir)
    hf = read_json(base_dir / "config.json", "config.json")
    family = find_family(hf.get("model_type"))
    if family is None or family.gguf is None:
        name = family.display_name if family else repr(hf.get("model_type"))
        raise CheckpointError(f"a {name} base has no llama.cpp architecture that loratune writes (GGUF export covers "
                              "Llama, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3): export the adapter with "
                              "--format peft instead")
    where = resolve_adapter_dir(adapter_dir)
    if where.is_file():
        raise ConfigError(f"{where} is already a LoRA GGUF: --adapter takes the PEFT-format adapter directory to export")
    _refuse_inexpressible(read_json(where / CONFIG_NAME, "adapter config"), where)
    config = family.config_from_hf(hf)
    with torch.device("meta"):
        meta = family.build(config)
    files = read_adapter(meta, where)  # config checked, family checked, modules named, finite
    quant = files.extra.get("base_quantization")
    kind = quant.get("kind") if isinstance(quant, dict) else None
    if kind and kind != "gguf":  # 'gguf': trained on the GGUF's own blocks, the weights llama.cpp runs
        log.warning(f"{where} was trained against a {kind}-quantized base (QLoRA), which llama.cpp does not run: "
                    "applied to the base GGUF, it computes something close to, not what, it was trained with")
    modules = targetable(meta)
    head = next((m for m in files.pairs if m.split(".")[-1] in HEAD_NAMES), None)
    if head and getattr(config, "tie_word_embeddings", False):
        raise CheckpointError(f"{where} adapts the output head ({head}), which this base ties to its token "
                              "embeddings: llama.cpp runs a tied head as the embedding matrix, so a LoRA GGUF has no "
                              f"output.weight to adapt; {_MERGE}")
    alpha = float(torch.tensor(float(files.config["lora_alpha"]), dtype=torch.float32))  # as the file holds it
    tensors = _lora_tensors(family, config, files, modules, alpha, qtype)
    metadata: dict[str, Any] = {  # the converter's: its LoraModel writes no file_type and no <arch>.* keys
        "general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": alpha, "general.name": where.name,
        "general.quantization_version": int(gguf_module().GGML_QUANT_VERSION),
    }
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory: name the .gguf file to write")
    return write_gguf(out, family.gguf.arch, metadata, tensors)


def _lora_tensors(family, config, files, modules: dict[str, Any], alpha: float,
                  qtype: str) -> dict[str, tuple[torch.Tensor, str]]:
    """GGUF name -> (tensor, type) of every pair: llama.cpp's names, B folded to the file's one alpha (where a
    module's rank, alpha or rsLoRA make its scale other than alpha / r) and q/k rows permuted."""
    hf = family.config_to_hf(config)
    weights = [n for n in hf_names_of(family, config) if n.endswith(".weight")]
    names = {h.removesuffix(".weight"): g for h, g in name_map(family.gguf.arch, config.num_hidden_layers,
                                                               weights).items()}
    rslora = bool(files.config.get("use_rslora", False))
    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    for module, pair in files.pairs.items():
        if module not in names:
            raise CheckpointError(f"{files.adapter_dir}: {module} has no tensor in llama.cpp's {family.gguf.arch} "
                                  "architecture, so a LoRA GGUF cannot adapt it")
        a, b = pair["A"].float(), pair["B"].float()
        in_f, out_f = features(modules[module])
        r = pattern_value(files.config.get("rank_pattern"), module, files.config["r"])
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise CheckpointError(f"{files.adapter_dir}: adapter tensors for {module} have shapes A {tuple(a.shape)}, "
                                  f"B {tuple(b.shape)}; this base's layer is {in_f} -> {out_f} at rank {r}: the "
                                  "adapter was made for another base")
        m_alpha = float(pattern_value(files.config.get("alpha_pattern"), module, files.config["lora_alpha"]))
        scale = m_alpha / (math.sqrt(r) if rslora else r)  # what PEFT (and loratune) apply
        fold = scale / (alpha / r)  # llama.cpp applies alpha / r, r read from the pair, alpha from the file
        if fold != 1.0:
            b = b * fold
        tensors[f"{names[module]}.lora_a"] = (a, qtype)
        tensors[f"{names[module]}.lora_b"] = (to_gguf(family.gguf, hf, f"{module}.weight", b).contiguous(), qtype)
    return tensors


def _refuse_inexpressible(config: Any, where: Path) -> None:
    """CheckpointError for what a llama.cpp LoRA GGUF cannot hold (it holds lora_a/lora_b pairs and one alpha)."""
    if not isinstance(config, dict):
        return  # read_adapter names the malformed file
    if config.get("use_dora"):
        raise CheckpointError(f"{where} is a DoRA adapter: its magnitude vectors have no place in a llama.cpp LoRA "
                              f"GGUF (lora_a/lora_b pairs only); {_MERGE}")
    if config.get("bias", "none") not in ("none", None):
        raise CheckpointError(f"{where} trains biases (bias={config['bias']!r}), which a llama.cpp LoRA GGUF cannot "
                              f"hold (lora_a/lora_b pairs only); {_MERGE}")
    if config.get("modules_to_save"):
        raise CheckpointError(f"{where} trains whole modules (modules_to_save {config['modules_to_save']}), which a "
                              f"llama.cpp LoRA GGUF cannot hold (lora_a/lora_b pairs only); {_MERGE}")
    embedding = next((e for e in _EMBEDDINGS if is_targeted(config, f"model.{e}")), None)
    if embedding:
        raise CheckpointError(f"{where} adapts the token embeddings ({embedding}), which "
                              f"loratune does not write to a LoRA GGUF (its LoRA layers are linear ones); {_MERGE}")
