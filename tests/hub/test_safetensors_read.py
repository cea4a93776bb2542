"""loratune/hub/files.py's safetensors reader: tensor by tensor into the tensors themselves, checked.

The reader parses the header itself and reads each tensor's bytes straight into a preallocated
tensor (no memory map, no second copy). It must read exactly what ``safetensors.torch.load_file``
reads (every dtype, 0-dim and empty tensors), convert floating tensors one by one when asked, and
turn every inconsistency into a CheckpointError that safetensors rejects too. A sharded checkpoint
is checked whole (shards present, index and shards agree) before any tensor is read.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from loratune.errors import CheckpointError
from loratune.hub import files
from loratune.hub.files import read_safetensors, read_state_dict
from loratune.models import load_model

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SHAPES = {"matrix": (3, 5), "scalar": (), "empty": (0, 4), "vector": (7,)}


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bytes as ``dtype`` (NaN patterns included for floats); 0/1 for bool."""
    numel = torch.Size(shape).numel()
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def _same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (bytes, so that NaNs compare equal)."""
    return (actual.dtype == expected.dtype and actual.shape == expected.shape
            and torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)))


def _pack(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_reads_as_safetensors_reads_it(tmp_path, name):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{name}.{kind}": _random(DTYPES[name], shape, gen) for kind, shape in SHAPES.items()}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    expected, actual = load_file(str(path)), read_safetensors(path)
    assert actual.keys() == expected.keys() == tensors.keys()
    for key in expected:
        assert _same(actual[key], expected[key]), key
        assert actual[key].is_contiguous() and actual[key].untyped_storage().nbytes() == actual[key].nbytes


def test_a_file_of_all_dtypes_and_no_tensors_read_back(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": _random(dtype, (2, 3), gen) for i, dtype in enumerate(DTYPES.values())}
    save_file(tensors, str(tmp_path / "all.safetensors"))
    assert all(_same(read_safetensors(tmp_path / "all.safetensors")[k], v) for k, v in tensors.items())
    save_file({}, str(tmp_path / "none.safetensors"))
    assert read_safetensors(tmp_path / "none.safetensors") == {}


def test_dtype_converts_floating_tensors_and_keeps_the_rest(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {"w": torch.randn(4, 6, generator=gen).bfloat16(), "h": torch.randn(3, generator=gen).half(),
               "ids": torch.arange(5), "mask": torch.tensor([True, False]), "s": torch.tensor(1.5).bfloat16()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    state = read_state_dict(tmp_path, torch.float32)
    for key, tensor in tensors.items():
        want = tensor.float() if tensor.is_floating_point() else tensor
        assert _same(state[key], want), key
    assert all(_same(read_safetensors(tmp_path / "model.safetensors")[k], v) for k, v in tensors.items())
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    assert all(_same(read_state_dict(tmp_path, torch.float32)[k], v.float() if v.is_floating_point() else v)
               for k, v in tensors.items())
    with pytest.raises(ValueError, match="floating torch.dtype"):
        read_state_dict(tmp_path, torch.int8)


def test_conversion_happens_as_each_tensor_is_read(tmp_path, monkeypatch):
    """The float32 copy of one tensor exists before the next bfloat16 tensor is read: never two whole copies."""
    save_file({f"w{i}": torch.ones(8, 8, dtype=torch.bfloat16) for i in range(3)}, str(tmp_path / "model.safetensors"))
    events = []
    real_empty = torch.empty

    def spy_empty(*args, **kwargs):
        events.append(f"read {kwargs.get('dtype')}")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(files.torch, "empty", spy_empty)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: events.append(f"to {a[0]}") or
                        self.float())
    state = read_state_dict(tmp_path, torch.float32)
    assert events == ["read torch.bfloat16", "to torch.float32"] * 3
    assert all(t.dtype == torch.float32 for t in state.values())


E = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_FILES = {
    "truncated": (_pack({"a": E, "b": {**E, "data_offsets": [8, 16]}}, b"\0" * 12),
                  "'b' ends at byte 16 of the data, but the file holds 12 after the header"),
    "header length beyond the file": (struct.pack("<Q", 10**6) + b"{}", "goes past the end of the file"),
    "shorter than 8 bytes": (b"\x01\x02", "fewer than the 8"),
    "bad JSON header": (_pack(b'{"a": {"dtype": "F32",', b""), "the header is not valid JSON"),
    "header not an object": (_pack(b"[1, 2]", b""), "not a JSON object"),
    "not UTF-8": (_pack(b'{"\xff": 1}', b""), "not valid JSON"),
    "overlapping offsets": (_pack({"a": E, "b": {**E, "data_offsets": [4, 12]}}, b"\0" * 12),
                            "'b' at data_offsets \\[4, 12\\] overlaps"),
    "out of bounds offsets": (_pack({"a": {**E, "data_offsets": [8, 16]}}, b"\0" * 8), "'a' ends at byte 16"),
    "a gap": (_pack({"a": {**E, "data_offsets": [4, 12]}}, b"\0" * 12), "'a' at data_offsets \\[4, 12\\] leaves a gap"),
    "trailing bytes": (_pack({"a": E}, b"\0" * 9), "describes 8 bytes of data, but the file holds 9"),
    "size not shape times dtype": (_pack({"a": {**E, "shape": [3]}}, b"\0" * 8), "needs 12 bytes"),
    "unknown dtype": (_pack({"a": {**E, "dtype": "F12"}}, b"\0" * 8), "unknown dtype 'F12'"),
    "negative shape": (_pack({"a": {**E, "shape": [-2]}}, b"\0" * 8), "not a list of sizes"),
    "reversed offsets": (_pack({"a": {**E, "data_offsets": [8, 0]}}, b"\0" * 8), "not \\[begin, end\\]"),
    "missing field": (_pack({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "needs dtype, shape and data_offsets"),
    "metadata of numbers": (_pack({"__metadata__": {"n": 1}, "a": E}, b"\0" * 8), "__metadata__ is not an object"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_an_inconsistent_file_is_a_checkpoint_error_that_safetensors_agrees_with(tmp_path, case):
    data, reason = BAD_FILES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable safetensors file \(.*{reason}.*\); "
                                              "it may be truncated or corrupt: download or save it again"):
        read_safetensors(path)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(tmp_path)
    with pytest.raises((SafetensorError, ValueError, KeyError)):  # the reference refuses it too: we are not stricter
        load(data)


def test_a_real_file_cut_anywhere_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(16), "b": torch.randn(4, 4)}, str(path))
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) - 64, 100, 9, 4, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_safetensors(path)


# --- sharded checkpoints ---------------------------------------------------------------------------

def _sharded(d: Path, shards: list[dict[str, torch.Tensor]], index: dict[str, str] | None = None) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    weight_map = index if index is not None else weight_map
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _three_shards(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{f"layers.{i}.w": torch.randn(4, 4, generator=gen).bfloat16(), f"layers.{i}.n": torch.arange(3) + i}
            for i in range(3)]


def test_a_sharded_checkpoint_reads_every_shard_and_converts(tmp_path):
    shards = _three_shards()
    _sharded(tmp_path, shards)
    expected = {k: v for shard in shards for k, v in shard.items()}
    state = read_state_dict(tmp_path)
    assert state.keys() == expected.keys() and all(_same(state[k], v) for k, v in expected.items())
    state = read_state_dict(tmp_path, torch.float32)
    assert all(_same(state[k], v.float() if v.is_floating_point() else v) for k, v in expected.items())


@pytest.fixture
def no_reads(monkeypatch):
    """Fails the test if any tensor's data is read: a broken checkpoint must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read before the checkpoint was checked whole")
    monkeypatch.setattr(files, "_read_tensor", refuse)


def test_a_missing_shard_is_named_before_anything_is_read(tmp_path, no_reads):
    _sharded(tmp_path, _three_shards())
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    index = tmp_path / "model.safetensors.index.json"
    with pytest.raises(CheckpointError, match=rf"2 of the 3 shards that {index} names are missing from {tmp_path}: "
                                              r"model-00002-of-00003\.safetensors, model-00003-of-00003\.safetensors; "
                                              r"download the missing shard\(s\)"):
        read_state_dict(tmp_path)


def test_a_tensor_the_index_puts_in_a_shard_that_lacks_it_is_refused(tmp_path, no_reads):
    shards = _three_shards()
    weight_map = {k: "model-00001-of-00003.safetensors" for shard in shards for k in shard}  # all in shard 1
    _sharded(tmp_path, shards, weight_map)
    with pytest.raises(CheckpointError, match=r"puts 4 tensor\(s\) in model-00001-of-00003.safetensors that it does "
                                              r"not hold \(e.g. layers.1.w, layers.1.n, layers.2.w\): the shard and "
                                              "the index do not match"):
        read_state_dict(tmp_path)


def test_a_corrupt_last_shard_fails_before_the_first_is_read(tmp_path, no_reads):
    _sharded(tmp_path, _three_shards())
    last = tmp_path / "model-00003-of-00003.safetensors"
    last.write_bytes(last.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=f"{last} is not a readable safetensors file"):
        read_state_dict(tmp_path)


def test_tensors_a_shard_holds_but_the_index_does_not_list_are_skipped_with_a_warning(tmp_path, caplog):
    shards = _three_shards()
    weight_map = _sharded(tmp_path, shards)
    del weight_map["layers.1.n"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with caplog.at_level(logging.WARNING, logger="loratune"):
        state = read_state_dict(tmp_path)
    assert set(state) == set(weight_map)
    warning = (f"{tmp_path / 'model-00002-of-00003.safetensors'} holds 1 tensor(s) that "
               "model.safetensors.index.json does not list; skipping them (e.g. layers.1.n)")
    assert [r.getMessage() for r in caplog.records] == [warning]


def test_load_model_reads_a_sharded_checkpoint_in_the_asked_dtype(tmp_path, tiny_ckpt):
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    keys = list(state)
    d = tmp_path / "sharded"
    _sharded(d, [{k: state[k] for k in keys[i::3]} for i in range(3)])
    (d / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    whole, _ = load_model(tiny_ckpt, dtype=torch.bfloat16)
    sharded, _ = load_model(d, dtype=torch.bfloat16)
    expected = whole.state_dict()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, expected[k]) for k, v in sharded.state_dict().items())
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors; download the missing shard"):
        load_model(d)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_llama_sharded_by_transformers_reads_back_equal(tmp_path, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "not sharded: the test would prove nothing"
    state = read_state_dict(tmp_path)
    expected = model.state_dict()
    if tied:
        assert "lm_head.weight" not in state  # transformers saves a tied head once, as the embedding
        expected.pop("lm_head.weight")
    assert state.keys() == expected.keys()
    assert all(_same(state[k], v.contiguous()) for k, v in expected.items())
    state32 = read_state_dict(tmp_path, torch.float32)
    assert all(_same(state32[k], v.float()) for k, v in expected.items())


def test_open_state_dict_reads_each_tensor_when_looked_up(tmp_path, monkeypatch):
    """The lazy view of a sharded checkpoint: the same tensors as read_state_dict, in its order, with every header
    checked up front and nothing read until a tensor is looked up (and read again at each lookup)."""
    gen = torch.Generator().manual_seed(0)
    shards = {"a.safetensors": {"x": _random(torch.bfloat16, (3, 4), gen), "y": _random(torch.float32, (5,), gen)},
              "b.safetensors": {"z": _random(torch.float16, (2, 2), gen)}}
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name)
    weight_map = {k: shard for shard, tensors in shards.items() for k in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reads = []
    original = files._read_tensor
    monkeypatch.setattr(files, "_read_tensor", lambda f, path, e, dtype: reads.append(e.shape) or original(f, path, e,
                                                                                                          dtype))
    lazy = files.open_state_dict(tmp_path, torch.float32)
    assert sorted(lazy) == ["x", "y", "z"] and list(lazy)[-1] == "z" and len(lazy) == 3 and lazy.shape("x") == (3, 4) and not reads
    assert torch.equal(lazy["z"], shards["b.safetensors"]["z"].float()) and lazy["z"].dtype == torch.float32
    assert torch.equal(lazy["z"], lazy["z"]) and len(reads) == 4  # read at each lookup, nothing kept
    eager = read_state_dict(tmp_path, torch.float32)
    assert list(eager) == list(lazy) and all(torch.equal(eager[k], lazy[k]) for k in eager)
