"""Read GGUF files (llama.cpp's checkpoint format): metadata, tensor layout, and the tensors themselves.

The header is parsed here (a bounded ``struct`` reader: gguf-py's own reader takes seconds on a large
vocabulary) and the tensors are memory-mapped: nothing is read until a tensor is asked for. The file
is checked before anything is built from it:

- the magic, version and header parse (a file that is not GGUF, or is cut inside its header, is a
  :class:`CheckpointError` naming it);
- every tensor's bytes lie inside the file (a file cut short, e.g. an interrupted download, is
  refused by the first tensor it cuts, not read as zeros or garbage);
- every tensor type is one loratune reads (:data:`READABLE_TYPES`); another is refused by name.

Quantized tensors are dequantized by gguf-py's ``gguf.quants.dequantize`` (llama.cpp's reference
decoders in numpy), or kept as their blocks (:class:`GGUFBlocks`) for a base trained in its own
quantization. Shapes here are torch's (out, in): GGUF lists dimensions innermost first.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

READABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
"""The tensor types loratune reads: llama.cpp's float types and the quantizations real files use most."""
FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_module():
    """The ``gguf`` package, or a CheckpointError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading or writing GGUF files needs the gguf package (llama.cpp's gguf-py): "
                              "pip install gguf") from None
    return gguf


def is_gguf_path(name_or_path: str | Path) -> bool:
    """Whether a model argument names a GGUF file (by its suffix; the file is checked when read)."""
    return str(name_or_path).lower().endswith(".gguf")


@dataclass(frozen=True)
class GGUFBlocks:
    """One tensor's bytes as the file stores them: ``data`` (rows, bytes per row) uint8, one row per
    output feature, each row a run of ``qtype`` blocks along the input dimension."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, ...]
    """The dequantized tensor's shape, torch order: (out, in) for a weight."""

    def dequantize(self) -> torch.Tensor:
        """float32, ``shape``: gguf-py's decoder on these bytes."""
        return _dequantize(self.data.numpy(), self.qtype, self.shape)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its name, type, torch-order shape, and its bytes (a view of the memory map,
    (rows, bytes per row) uint8)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    _raw: Any

    def blocks(self) -> GGUFBlocks:
        """The bytes as stored (copied out of the memory map), for a base kept in its quantization."""
        return GGUFBlocks(torch.from_numpy(np.array(self._raw)), self.qtype, self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as floats (float32 unless ``dtype``), in torch order."""
        if self.qtype == "F32":
            out = torch.from_numpy(np.array(self._raw).view(np.float32).reshape(self.shape))
        elif self.qtype == "F16":
            out = torch.from_numpy(np.array(self._raw).view(np.float16).reshape(self.shape)).float()
        else:
            out = _dequantize(self._raw, self.qtype, self.shape)
        return out if dtype is None or out.dtype == dtype else out.to(dtype)


def _dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    gguf = gguf_module()
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


@dataclass(frozen=True)
class GGUFFile:
    """A parsed, checked GGUF file: ``metadata`` (key -> str, int, float, bool or a list of them) and
    ``tensors`` by name, in file order."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path} has no general.architecture: it is not a model GGUF")
        return arch

    @property
    def file_type(self) -> str:
        """What the file says it is, e.g. 'adapter' for a LoRA adapter GGUF, 'model' otherwise."""
        kind = self.metadata.get("general.type", "model")
        return kind if isinstance(kind, str) else "model"

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and check a GGUF file; nothing but the header is read until a tensor is used. The same
    unchanged file is parsed once per process."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}" if not path.exists() else f"{path} is not a file")
    stat = path.stat()
    return _read_cached(path.resolve(), stat.st_size, stat.st_mtime_ns, path)


@functools.lru_cache(maxsize=4)
def _read_cached(real: Path, size: int, mtime_ns: int, shown: Path) -> GGUFFile:
    gguf = gguf_module()
    with real.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{shown} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    data = np.memmap(real, dtype=np.uint8, mode="r")
    try:
        metadata, infos, header_end = _Header(data, size).parse()
    except _Short as exc:
        raise CheckpointError(f"{shown} is a corrupt or truncated GGUF file ({exc}); download or export it "
                              "again") from None
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{shown}: general.alignment {align!r} is not a power of two; the file is corrupt")
    start = -(-header_end // align) * align
    tensors = {}
    for name, dims, type_id, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(type_id).name
        except ValueError:
            raise CheckpointError(f"{shown}: tensor {name} has type id {type_id}, which no GGUF reader knows; the "
                                  "file is corrupt or newer than gguf-py") from None
        if qtype not in READABLE_TYPES:
            raise CheckpointError(f"{shown}: tensor {name} has type {qtype}, which loratune does not read; "
                                  f"readable: {', '.join(READABLE_TYPES)} (re-quantize the model to one of them "
                                  "with llama.cpp's llama-quantize)")
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        shape = tuple(reversed(dims)) or (1,)
        if any(d <= 0 for d in shape) or shape[-1] % block:
            raise CheckpointError(f"{shown}: tensor {name} has shape {shape}, not whole {qtype} blocks; the file is "
                                  "corrupt")
        rows = math.prod(shape[:-1])
        row_bytes = shape[-1] // block * type_size
        begin, end = start + offset, start + offset + rows * row_bytes
        if end > size:
            raise CheckpointError(f"{shown} is truncated: tensor {name} ends at byte {end:,} but the file has "
                                  f"{size:,} bytes; download or export it again")
        tensors[name] = GGUFTensor(name, qtype, shape, data[begin:end].reshape(rows, row_bytes))
    return GGUFFile(shown, metadata, tensors)


class _Short(Exception):
    """The header ends early or holds an impossible count."""


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Header:
    """GGUF v2/v3's header (magic, version, counts, key/values, tensor infos) parsed from the memory map with
    ``struct``: gguf-py's reader builds a numpy view per array element, which takes seconds on a 262k-token
    vocabulary; this reads a numeric array in one ``frombuffer`` and bounds every count by the file's size."""

    def __init__(self, data: np.ndarray, size: int) -> None:
        self.buf, self.size, self.pos = memoryview(data), size, 0

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Short(f"the header ends at byte {self.size:,}, inside a value at byte {self.pos:,}")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def count(self, least_bytes: int) -> int:
        n = self.take("<Q")
        if n * least_bytes > self.size - self.pos:
            raise _Short(f"a count of {n:,} at byte {self.pos - 8:,} exceeds what the file can hold")
        return n

    def string(self) -> str:
        n = self.count(1)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Short(f"a string at byte {self.pos - n:,} is not UTF-8") from None

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item = self.take("<I")
            if item in _NUMPY:
                width = np.dtype(_NUMPY[item]).itemsize
                n = self.count(width)
                values = np.frombuffer(self.buf, dtype=_NUMPY[item], count=n, offset=self.pos).tolist()
                self.pos += n * width
                return values
            if item == _STRING:
                return [self.string() for _ in range(self.count(8))]
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(self.count(12))]
        raise _Short(f"unknown value type {kind} at byte {self.pos:,}")

    def parse(self) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
        self.pos = 4
        version = self.take("<I")
        if version not in (2, 3):
            raise _Short(f"GGUF version {version}; loratune reads versions 2 and 3")
        n_tensors, n_kv = self.count(24), self.count(12)
        metadata = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            n_dims = self.take("<I")
            if n_dims > 4:
                raise _Short(f"tensor {name} has {n_dims} dimensions (GGML has at most 4)")
            dims = [self.take("<Q") for _ in range(n_dims)]
            infos.append((name, dims, self.take("<I"), self.take("<Q")))
        return metadata, infos, self.pos
