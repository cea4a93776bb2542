"""Read Hugging Face model files: JSON, safetensors (single or sharded), and pickles safely.

Pickled weights (``pytorch_model.bin``) are only read with ``torch.load(weights_only=True)``,
which refuses to run code hidden in the file. Safetensors files are parsed here (header checked as
safetensors checks it) and read tensor by tensor into the tensors themselves: no memory map, no
second copy, and a dtype conversion per tensor, so a multi-GB model loads in about its size.
:func:`open_state_dict` gives the same tensors lazily (:class:`LazyStateDict`: each read when looked up),
so a loader that quantizes each projection as it arrives never holds the float model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_DTYPES = {name: dtype for name, dtype in (
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8),
    ("BOOL", torch.bool), ("C64", torch.complex64),
    ("U64", getattr(torch, "uint64", None)), ("U32", getattr(torch, "uint32", None)),
    ("U16", getattr(torch, "uint16", None)),
    ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)), ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
    ("F8_E4M3FNUZ", getattr(torch, "float8_e4m3fnuz", None)),
    ("F8_E5M2FNUZ", getattr(torch, "float8_e5m2fnuz", None)),
) if dtype is not None}
"""safetensors dtype names -> torch dtypes (those this torch has), as safetensors.torch maps them."""


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object file, with errors that name the file."""
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(model_dir: Path) -> dict[str, Any]:
    """The model directory's config.json as a dict."""
    return read_json(model_dir / "config.json", "config.json")


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a corrupt or truncated file is a CheckpointError.

    Each tensor's bytes are read straight into its own tensor (no memory map, no second copy), so
    reading a file costs about its size in memory. With ``dtype``, each floating tensor is
    converted as soon as it is read: a bfloat16 file loaded as float32 never holds both copies.
    """
    return _read_tensors(path, _check_dtype(dtype), None)


def _check_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


@dataclass(frozen=True)
class _TensorEntry:
    """One tensor of a safetensors header: where its bytes lie in the file (absolute offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _corrupt(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({reason}); "
                           "it may be truncated or corrupt: download or save it again")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_json(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, Any], int]:
    if size < 8:
        raise _corrupt(path, f"the file has {size} bytes, fewer than the 8 of the header length")
    length = int.from_bytes(f.read(8), "little")
    if length > min(size - 8, _MAX_HEADER_BYTES):
        raise _corrupt(path, f"the header length {length:,} goes past the end of the file ({size:,} bytes)"
                       if length > size - 8 else f"the header length {length:,} is over the 100 MB limit")
    raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _corrupt(path, f"the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    return header, 8 + length


def _entry(path: Path, name: str, info: Any, data_start: int) -> _TensorEntry:
    if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - set(info):
        raise _corrupt(path, f"tensor {name!r} needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r} "
                       f"(known: {', '.join(sorted(_DTYPES))})")
    if not isinstance(shape, list) or not all(_is_count(n) and n < 2**63 for n in shape):
        raise _corrupt(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes in [0, 2**63)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(path, f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes:,} bytes, "
                       f"but its data_offsets {offsets} span {offsets[1] - offsets[0]:,}")
    return _TensorEntry(_DTYPES[dtype], tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _read_header(f: BinaryIO, path: Path) -> dict[str, _TensorEntry]:
    """The tensors a safetensors file holds, checked as safetensors itself checks them: known dtypes,
    sizes that match shapes, and data that tiles the rest of the file exactly (no overlap, no gap)."""
    size = os.fstat(f.fileno()).st_size
    header, data_start = _header_json(f, path, size)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str)
                                                                        for v in metadata.values())):
        raise _corrupt(path, "__metadata__ is not an object of strings")
    entries = {name: _entry(path, name, info, data_start) for name, info in header.items()}
    position = data_start
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.end > size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {e.end - data_start:,} of the data, but the file "
                           f"holds {size - data_start:,} after the header")
        if e.begin != position:
            what = "overlaps the tensor before it" if e.begin < position else "leaves a gap before it"
            raise _corrupt(path, f"tensor {name!r} at data_offsets [{e.begin - data_start}, {e.end - data_start}] "
                           f"{what}")
        position = e.end
    if position != size:
        raise _corrupt(path, f"the header describes {position - data_start:,} bytes of data, but the file holds "
                       f"{size - data_start:,} after the header")
    return entries


def _read_tensors(path: Path, dtype: torch.dtype | None, names: Iterable[str] | None) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb", buffering=0) as f:  # unbuffered: readinto fills the tensor itself
            entries = _read_header(f, path)
            wanted = set(entries if names is None else names)
            state = {}
            for name, e in sorted(entries.items(), key=lambda item: item[1].begin):  # one pass through the file
                if name in wanted:
                    state[name] = _read_tensor(f, path, e, dtype)
            return state
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_tensor(f: BinaryIO, path: Path, e: _TensorEntry, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = torch.empty(e.shape, dtype=e.dtype)
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes
    f.seek(e.begin)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise _corrupt(path, "the file ended early (did it change while being read?)")
        done += got
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


def read_pickled_tensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A dict of tensors from a pickle file, with ``weights_only=True``: code hidden in it is refused.

    With ``dtype``, floating tensors are converted one at a time after loading (a pickle cannot be
    read tensor by tensor).
    """
    dtype = _check_dtype(dtype)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many kinds; all mean the same to the user
        raise CheckpointError(f"refusing to load {path}: it is corrupt or holds more than tensors "
                              f"(weights_only=True rejected it: {str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    if dtype is not None:
        for key, tensor in state.items():  # replaced in place: each old tensor is freed as we go
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks: identifies an adapter's weights whatever its path."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(model_dir: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model directory's weights: model.safetensors, a sharded index, or (safely) pytorch_model.bin.

    Where a directory holds several of them (hub repos often ship both safetensors and a pickle),
    the first of :data:`WEIGHT_FILES` wins, and a log line says which file was read and which
    were ignored, so that a user who edited the other file learns why it had no effect.
    With ``dtype``, floating tensors are converted as they are read (integer ones are kept), so
    a multi-GB model costs about its converted size in memory, not two copies.
    """
    return dict(open_state_dict(model_dir, dtype))  # in file order: one pass through each file


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A checkpoint's safetensors tensors by name, each read from its file when it is looked up (and again
    at every lookup: nothing is kept), in file order.

    What lets a loader hold one full-precision tensor at a time: QLoRA quantizes each projection as it
    is read and drops the float copy before the next (loratune.quant.load). Every header was checked
    when this was built, so a broken file fails before the first tensor is read.
    """

    def __init__(self, entries: dict[str, tuple[Path, _TensorEntry]], dtype: torch.dtype | None) -> None:
        self._entries, self._dtype = entries, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        path, e = self._entries[name]
        try:
            with open(path, "rb", buffering=0) as f:  # unbuffered: readinto fills the tensor itself
                return _read_tensor(f, path, e, self._dtype)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header (nothing is read)."""
        return self._entries[name][1].shape


def open_state_dict(model_dir: Path, dtype: torch.dtype | None = None) -> Mapping[str, torch.Tensor]:
    """The model directory's weights as :func:`read_state_dict` chooses and checks them, but read lazily:
    safetensors (single or sharded) as a :class:`LazyStateDict`, whose tensors are read one lookup at a
    time; a pickle (``pytorch_model.bin``, which cannot be read tensor by tensor) as the dict it loads.
    ``dtype`` as for :func:`read_state_dict`, applied to each tensor as it is read."""
    dtype = _check_dtype(dtype)
    present = [name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not present:
        raise CheckpointError(f"no weights in {model_dir}: expected one of {', '.join(WEIGHT_FILES)}")
    used, ignored = present[0], present[1:]
    if ignored:
        log.info(f"{model_dir} holds {', '.join(present)}: reading {used}, ignoring {', '.join(ignored)}")
    if used == "model.safetensors":
        return LazyStateDict(_file_entries(model_dir / used, None), dtype)
    if used == "model.safetensors.index.json":
        return LazyStateDict(_sharded_entries(model_dir, model_dir / used), dtype)
    return read_pickled_tensors(model_dir / used, dtype)


def _file_entries(path: Path, names: Iterable[str] | None) -> dict[str, tuple[Path, _TensorEntry]]:
    """name -> (path, entry) for the tensors of one safetensors file (``names``: only those), in file order."""
    try:
        with open(path, "rb", buffering=0) as f:
            entries = _read_header(f, path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    wanted = set(entries if names is None else names)
    return {name: (path, e) for name, e in sorted(entries.items(), key=lambda item: item[1].begin) if name in wanted}


def _shard_paths(model_dir: Path, index: Path) -> tuple[dict[str, str], dict[str, Path]]:
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v and "\0" not in v
                                                   for v in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to shard file names")
    paths = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = (model_dir / shard).resolve()  # symlinks followed: a link out of the directory is refused too
        if model_dir.resolve() not in shard_path.parents:
            raise CheckpointError(f"{index} names a shard outside the checkpoint directory: {shard}")
        paths[shard] = shard_path
    missing = [shard for shard, path in paths.items() if not path.is_file()]
    if missing:
        raise CheckpointError(f"{len(missing)} of the {len(paths)} shards that {index} names are missing from "
                              f"{model_dir}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                              "download the missing shard(s)")
    return weight_map, paths


def _sharded_entries(model_dir: Path, index: Path) -> dict[str, tuple[Path, _TensorEntry]]:
    """Every shard is checked (present, a valid header holding the tensors the index puts there)
    before any tensor is read, so a broken model directory fails in seconds, not after minutes of reading.

    The index decides what is read: a shard's tensors the index does not list are skipped, with a
    warning (they are stale copies or belong to another revision).
    """
    weight_map, paths = _shard_paths(model_dir, index)
    listed: dict[str, list[str]] = {shard: [] for shard in paths}
    for name, shard in weight_map.items():
        listed[shard].append(name)
    entries: dict[str, tuple[Path, _TensorEntry]] = {}
    for shard, path in paths.items():
        held = _file_entries(path, None)
        absent = [name for name in listed[shard] if name not in held]
        if absent:
            raise CheckpointError(f"{index} puts {len(absent)} tensor(s) in {shard} that it does not hold "
                                  f"(e.g. {', '.join(absent[:3])}): the shard and the index do not match; "
                                  "download them again")
        extra = sorted(set(held) - set(listed[shard]))
        if extra:
            log.warning(f"{path} holds {len(extra)} tensor(s) that {index.name} does not list; skipping them "
                        f"(e.g. {', '.join(extra[:3])})")
        wanted = set(listed[shard])
        entries.update((name, entry) for name, entry in held.items() if name in wanted)
    return entries
