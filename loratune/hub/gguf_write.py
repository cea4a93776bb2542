"""Write GGUF files with gguf-py's ``GGUFWriter``: metadata, then tensors in a stored type.

Tensors come in torch order (out, in) and float; :func:`write_gguf` quantizes each to its type with
gguf-py (``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``: the types gguf-py
quantizes; the K-quants need llama.cpp's own quantizer) or takes bytes already in blocks
(:class:`~loratune.hub.gguf_file.GGUFBlocks`). The file is written beside its final name and renamed
into place: complete or absent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..runtime.fsutil import full_disk_is_a_resource_error
from .gguf_file import GGUFBlocks, gguf_module

WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
"""What gguf-py quantizes (its K-quant quantizers are not implemented)."""


def _value_type(gguf, value: Any):
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return T.BOOL, None
    if isinstance(value, int):
        return (T.UINT32 if 0 <= value < 2**32 else T.INT64), None
    if isinstance(value, float):
        return T.FLOAT32, None
    if isinstance(value, str):
        return T.STRING, None
    if isinstance(value, (list, tuple)):
        first = value[0] if value else ""
        sub = (T.STRING if isinstance(first, str) else T.BOOL if isinstance(first, bool)
               else T.INT32 if isinstance(first, int) else T.FLOAT32)
        return T.ARRAY, sub
    raise ConfigError(f"cannot store {type(value).__name__} {value!r} as GGUF metadata")


def storage_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The type a tensor is stored in when ``qtype`` is asked: 1-D tensors (norms, biases) stay F32 and a
    row that is not whole blocks falls back to F16, as llama.cpp's converter does."""
    if len(shape) < 2:
        return "F32"
    if qtype in ("F32", "F16", "BF16"):
        return qtype
    block = gguf_module().GGML_QUANT_SIZES[gguf_module().GGMLQuantizationType[qtype]][0]
    return qtype if shape[-1] % block == 0 else "F16"


def write_gguf(path: str | Path, arch: str, metadata: Mapping[str, Any],
               tensors: Mapping[str, tuple[torch.Tensor | GGUFBlocks, str]]) -> Path:
    """Write ``tensors`` (GGUF name -> (tensor, type) in torch order, or blocks as they are) and
    ``metadata`` (key -> str, int, float, bool or a list) to ``path``; ``general.architecture`` is ``arch``."""
    gguf = gguf_module()
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs each file's plan at INFO
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for key, value in metadata.items():
            if key == "general.architecture":
                continue
            vtype, sub = _value_type(gguf, value)
            writer.add_key_value(key, list(value) if isinstance(value, tuple) else value, vtype, sub_type=sub)
        for name, (tensor, qtype) in tensors.items():
            if isinstance(tensor, GGUFBlocks):
                writer.add_tensor(name, tensor.data.numpy(),
                                  raw_dtype=gguf.GGMLQuantizationType[tensor.qtype])
                continue
            kind = storage_type(name, tuple(tensor.shape), qtype)
            if kind not in WRITABLE_TYPES:
                raise ConfigError(f"gguf-py cannot quantize to {kind}; writable here: {', '.join(WRITABLE_TYPES)}")
            data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
            if kind == "F32":
                writer.add_tensor(name, data)
            elif kind == "F16":
                writer.add_tensor(name, data.astype(np.float16))
            else:
                qt = gguf.GGMLQuantizationType[kind]
                packed = gguf.quants.quantize(data, qt)
                writer.add_tensor(name, packed, raw_dtype=qt)
        with full_disk_is_a_resource_error(f"the GGUF file {path}", "the unfinished file was removed; free some "
                                           "space or write elsewhere"):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
