"""A whole model (the base, or the base with adapters merged) as one GGUF file that llama.cpp runs.

The weights come as the Hugging Face exporter takes them (``model.to_hf_state_dict()``: transformers'
names, merged adapters inside the weights) and go to llama.cpp's names and layout through the family's
:class:`~loratune.models.gguf.GGUFFacts` (gguf-py's name table, the q/k row permutation, Gemma's
``1 + w`` norms), exactly as llama.cpp's ``convert_hf_to_gguf.py`` writes them; a tied head is stored
once (no ``output.weight``). The metadata is the converter's: ``general.*``, the ``<arch>.*`` keys of the
config, the family's own keys and tensors (``rope_freqs``, longrope factors), and the tokenizer with its
chat template (built from a Hugging Face tokenizer directory, or copied as it is from a GGUF source).

Output types: the float types and what gguf-py quantizes (:data:`GGUF_PY_OUTTYPES`) are written
directly; llama.cpp's K-quants (:data:`LLAMA_CPP_OUTTYPES`) are made by llama.cpp's own
``llama_model_quantize`` (llama-cpp-python) from an F32 file written first, or refused with that
advice where it is not installed. Every file is written beside its name and renamed: complete or absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hub.gguf_file import gguf_module, read_gguf
from ..hub.gguf_write import write_gguf
from ..models.gguf import config_metadata, name_map, to_gguf
from ..models.gguf_dir import gguf_config, gguf_source
from ..runtime.finite import check_finite

log = logging.getLogger(__name__)

GGUF_PY_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
"""--outtype values written here with gguf-py (1-D tensors stay F32, as llama.cpp's converter keeps them)."""
LLAMA_CPP_OUTTYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
"""--outtype values made by llama.cpp's quantizer (llama-cpp-python), llama-quantize's names."""
OUTTYPES = GGUF_PY_OUTTYPES + LLAMA_CPP_OUTTYPES

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}
"""--outtype -> gguf-py's ``LlamaFileType`` member (``general.file_type``, as llama.cpp names the file's type)."""


def check_outtype(outtype: str) -> str:
    """``outtype`` in lower case, or a ConfigError listing the types there are."""
    kind = str(outtype).lower()
    if kind not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r} is not a GGUF type loratune writes; choose one of "
                          f"{', '.join(GGUF_PY_OUTTYPES)} (gguf-py) or {', '.join(LLAMA_CPP_OUTTYPES)} (llama.cpp)")
    return kind


def llama_cpp_module(outtype: str):
    """llama-cpp-python, which makes the K-quants, or a ConfigError saying how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(f"--outtype {outtype} is made by llama.cpp's own quantizer, which needs llama-cpp-python: "
                          f"pip install llama-cpp-python (or choose {', '.join(GGUF_PY_OUTTYPES)})") from None
    return llama_cpp


def family_facts(model: nn.Module):
    """The family's GGUF facts, or a ConfigError naming the family llama.cpp's format does not take here."""
    facts = getattr(model.family, "gguf", None)
    if facts is None:
        raise ConfigError(f"loratune does not write {model.family.display_name} models as GGUF (llama.cpp's "
                          "converter layout is known here for Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3); "
                          "export --format hf and convert that with llama.cpp's convert_hf_to_gguf.py")
    return facts


def tokenizer_metadata(model_dir: Path, arch: str) -> dict[str, Any]:
    """The ``tokenizer.*`` keys (vocabulary, merges or scores, special ids, chat template): a GGUF source's
    own, exactly as its file holds them; else built from the Hugging Face tokenizer directory as llama.cpp's
    converter builds them."""
    source = gguf_source(model_dir)
    if source is not None:
        return {k: v for k, v in source.metadata.items() if k.startswith("tokenizer.")}
    from ..hub.gguf_vocab import gguf_tokenizer_metadata

    return gguf_tokenizer_metadata(Path(model_dir), arch)


def model_name(model: nn.Module, model_dir: Path) -> str:
    """``general.name``: the GGUF source's, or the model directory's name; it holds the family's hint where
    several families share an architecture (llama.cpp and transformers tell Mistral from Llama by it)."""
    source = gguf_source(model_dir)
    name = source.get("general.name") if source is not None else None
    if not (isinstance(name, str) and name):
        path = Path(model_dir)
        hub = path.parent.parent.name if path.parent.name == "snapshots" else ""  # models--org--name/snapshots/sha
        name = hub.split("--")[-1] if hub.startswith("models--") else path.name
    hint = model.family.gguf.name_hint
    return name if not hint or hint in name.lower() else f"{model.family.display_name} {name}"


def gguf_model_parts(model: nn.Module, model_dir: Path, outtype: str) -> tuple[str, dict[str, Any], dict]:
    """(architecture, metadata, GGUF name -> (tensor, type)) of ``model`` (merged: no LoRA layer left
    unmerged) as llama.cpp's converter writes it with ``--outtype outtype`` (one of :data:`GGUF_PY_OUTTYPES`)."""
    facts = family_facts(model)
    if any(getattr(m, "merged", None) is False for m in model.modules()):
        raise CheckpointError("the model has unmerged LoRA layers: merge them before exporting a whole-model GGUF")
    gguf = gguf_module()
    hf = model.family.config_to_hf(model.config)
    state = model.to_hf_state_dict()
    if hf.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    check_finite(state, "the model to export", "nothing was written")
    names = name_map(facts.arch, hf["num_hidden_layers"], list(state))
    qtype = outtype.upper()
    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    for hf_name, tensor in state.items():  # (out, in) -> llama.cpp's rows
        tensors[names[hf_name]] = (to_gguf(facts, hf, hf_name, tensor.detach().to("cpu", torch.float32)), qtype)
    for name, tensor in facts.extra_tensors(hf).items():
        tensors[name] = (tensor.to(torch.float32), "F32")
    metadata: dict[str, Any] = {
        "general.type": "model", "general.name": model_name(model, model_dir),
        "general.file_type": int(gguf.LlamaFileType[_FILE_TYPES[outtype]]),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
    }
    metadata.update(config_metadata(facts.arch, hf))
    metadata.update(facts.metadata(hf))
    metadata.update(tokenizer_metadata(model_dir, facts.arch))
    return facts.arch, metadata, tensors


def write_model_gguf(model: nn.Module, model_dir: Path, out: str | Path, outtype: str = "f16") -> Path:
    """Write ``model`` (read from ``model_dir``, whose tokenizer and GGUF source are used) to the GGUF
    file ``out`` in ``outtype``; a K-quant goes through llama.cpp's quantizer. Returns ``out``.

    The file is written under a temporary name and its metadata read back as loratune reads any GGUF:
    a config the GGUF does not hold is refused (:func:`check_config_kept`) and nothing is left behind."""
    outtype = check_outtype(outtype)
    out = Path(out)
    quantizer = llama_cpp_module(outtype) if outtype in LLAMA_CPP_OUTTYPES else None
    tmp = out.with_name(f".tmp-export-{out.name}-{os.getpid()}")
    try:
        with _quiet("gguf.gguf_writer"):  # its INFO lines list the temporary file's name
            write_gguf(tmp, *gguf_model_parts(model, model_dir, "f32" if quantizer else outtype))
        check_config_kept(model, tmp, out)
        if quantizer is not None:
            llama_quantize(quantizer, tmp, out, outtype)  # llama.cpp logs each tensor on stderr, as llama-quantize
        else:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Logger ``name`` at WARNING for the block (unless loratune runs with -v: DEBUG on the root)."""
    logger = logging.getLogger(name)
    level = logger.level
    if logging.getLogger().level > logging.DEBUG:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def llama_quantize(llama_cpp, src: Path, out: Path, outtype: str) -> None:
    """llama.cpp's ``llama_model_quantize`` (what ``llama-quantize`` runs) from ``src`` to ``out``, renamed
    into place when complete."""
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = max(1, min(os.cpu_count() or 1, 8))
    llama_cpp.llama_backend_init()
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if status != 0 or not tmp.is_file():
            raise CheckpointError(f"llama.cpp's quantizer failed to write {outtype} (status {status}); nothing "
                                  f"was written to {out}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


_TOKENIZER_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""Config fields a GGUF takes from its tokenizer metadata (llama.cpp stops on the tokenizer's ids)."""
_WINDOW_FIELDS = ("sliding_window", "layer_types")
"""Config fields llama.cpp drops for Mistral and Qwen2 (as its own converter does): warned, not refused,
since they change nothing within the window."""


def _same(a: Any, b: Any) -> bool:
    """Equal, floats up to float32 rounding (GGUF stores float32), inside dataclasses, dicts and sequences."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(abs(a), abs(b))
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config_kept(model: nn.Module, written: Path, out: Path) -> None:
    """Read the written file's metadata back as loratune reads any GGUF, and compare the config it gives
    with the model's: a field the GGUF does not hold is refused (llama.cpp would run another model),
    except a Mistral or Qwen2 sliding window, which llama.cpp's own converter drops too (warned)."""
    family, hf = gguf_config(read_gguf(written))
    back = family.config_from_hf(hf)
    if not dataclasses.is_dataclass(model.config) or type(back) is not type(model.config):
        raise CheckpointError(f"the GGUF written for {out} reads back as a {family.display_name}, not this "
                              f"{model.family.display_name}; nothing was written")
    lost = {f.name: f"{f.name}={_shown(getattr(model.config, f.name))} (the GGUF gives "
                    f"{_shown(getattr(back, f.name))})"
            for f in dataclasses.fields(model.config)
            if f.name not in _TOKENIZER_FIELDS and not _same(getattr(model.config, f.name), getattr(back, f.name))}
    refused = [text for name, text in lost.items() if name not in _WINDOW_FIELDS]
    if refused:
        raise ConfigError(f"llama.cpp's GGUF cannot hold this {model.family.display_name} as it is: "
                          f"{'; '.join(refused)}; nothing was written to {out}")
    if lost:
        log.warning(f"{out}: llama.cpp runs this {model.family.display_name} without its sliding window (as its own "
                    f"converter writes it), so outputs differ past the window: {'; '.join(lost.values())}")
