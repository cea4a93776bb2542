"""NF4 storage (loratune/quant/nf4.py): the published table, the expected error on Gaussian weights,
bitsandbytes' bytes and values bit for bit, storage cost, refused inputs, and the tiles the fused
product dequantizes."""

from __future__ import annotations

import math

import pytest
import torch

from loratune.errors import CheckpointError, ConfigError
from loratune.quant import NF4_LEVELS, NF4Weight, bits_per_param, block_absmax, dequantize_nf4, quantize_nf4
from loratune.quant.nf4 import TileScratch, dequantize_nf4_tile, tiles_by_row_blocks

PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
"""QLoRA (Dettmers et al. 2023), appendix E: the NF4 data type's 16 values."""


def test_levels_are_the_published_table():
    assert list(NF4_LEVELS) == PUBLISHED
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert NF4_LEVELS == tuple(bnb_functional.get_4bit_type("nf4", device="cpu").tolist())


def expected_nf4_mse(block: int = 64) -> float:
    """E[(dequant(quant(x)) - x)^2] for x ~ N(0, 1) in absmax blocks of ``block``, by quadrature.

    In a block, the element of largest magnitude M is stored exactly (it maps to the level +-1);
    given M = m, the other block - 1 elements are N(0, 1) conditioned on |x| < m, each rounded to
    the level whose midpoint bracket holds x / m. Per bracket [a, b] with level c (all times m),
    int_a^b (x - c)^2 phi = (1 + c^2)(Phi(b) - Phi(a)) - (b phi(b) - a phi(a)) + 2c (phi(b) - phi(a)),
    and M has density block (2 Phi(m) - 1)^(block - 1) 2 phi(m). Independent of the implementation.
    """
    c = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    edges = torch.cat([c[:1], (c[:-1] + c[1:]) / 2, c[-1:]])
    m = torch.linspace(1e-6, 9.0, 40001, dtype=torch.float64)
    a, b, cm = m[:, None] * edges[:-1], m[:, None] * edges[1:], m[:, None] * c
    Phi = torch.special.ndtr  # noqa: N806

    def phi(x):
        return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    s = ((1 + cm**2) * (Phi(b) - Phi(a)) - (b * phi(b) - a * phi(a)) + 2 * cm * (phi(b) - phi(a))).sum(1)
    # E over M of (block - 1) * s / (2 Phi(m) - 1), per element of the block
    density_times_s = block * (2 * Phi(m) - 1) ** (block - 2) * 2 * phi(m) * s
    return (block - 1) / block * float(torch.trapezoid(density_times_s, m))


def test_gaussian_error_matches_the_expected_error():
    """Measured RMS error on 2^20 N(0, 1) values is the analytic one (seeds 0-4 measured within 0.4%)."""
    expected = expected_nf4_mse(64)
    assert 0.0084 < expected < 0.0085  # RMS ~0.092 of the standard deviation
    torch.manual_seed(0)
    w = torch.randn(1 << 20)
    mse = float((dequantize_nf4(quantize_nf4(w, double_quant=False)) - w).pow(2).mean())
    assert mse == pytest.approx(expected, rel=0.015)
    # double quantization moves each block's scale by a fraction of a percent: the error barely changes
    mse_dq = float((dequantize_nf4(quantize_nf4(w, double_quant=True)) - w).pow(2).mean())
    assert mse_dq == pytest.approx(mse, rel=0.01)


SHAPES = [(64, 128), (33, 70), (7, 33), (300, 256), (3,)]
"""Whole blocks; 2,310 values (a partial last block); 231 (odd: a spare nibble); 1,200 blocks (five
256-block absmax groups, the last partial); fewer values than a block."""


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bit_exact_with_bitsandbytes(shape, double_quant, dtype):
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    w = (torch.randn(shape) * 0.02).to(dtype)
    w.view(-1)[: w.numel() // 3] *= 30  # blocks of very different scales
    q = quantize_nf4(w, 64, double_quant)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(q.data, packed.flatten())
    if double_quant:
        assert torch.equal(q.absmax, state.absmax)
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)
    else:
        assert torch.equal(q.absmax, state.absmax)
    out = dequantize_nf4(q)
    assert out.shape == w.shape and out.dtype == dtype
    with torch.compiler.set_stance("force_eager"):  # bnb compiles its dequantize for odd shapes: slow, same values
        assert torch.equal(out, bnb.dequantize_4bit(packed, state))


def test_ties_take_the_lower_level_as_bitsandbytes():
    """Values exactly on a midpoint between two levels (block absmax 1, so x / absmax = x)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    levels = torch.tensor(NF4_LEVELS)
    mid = (levels[:-1] + levels[1:]) / 2
    w = torch.cat([torch.ones(1), mid, -mid, torch.zeros(64 - 31)])
    q = quantize_nf4(w, double_quant=False)
    packed, _ = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.data, packed.flatten())
    codes = torch.stack([q.data >> 4, q.data & 15], 1).flatten().long()
    assert torch.equal(codes[1:16], torch.arange(15))  # midpoint k..k+1 -> level k


def test_block_size_128_and_bitsandbytes_cpu_row_bug():
    """Block 128 matches too. For rows whose length is a multiple of 16 but not of the block (80 here),
    bitsandbytes 0.50's CPU dequantize reads the absmax per row instead of per flat block; its quantize
    does not, so we compare with a flat decode of its own bytes and absmax."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(2)
    for shape, block in (((48, 256), 128), ((5, 80), 64)):
        w = torch.randn(shape)
        q = quantize_nf4(w, block)
        packed, state = bnb.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=True)
        assert torch.equal(q.data, packed.flatten())
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(block_absmax(q), absmax)
        codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten()[: w.numel()].long()
        levels = bnb.get_4bit_type("nf4", device="cpu")
        flat_decode = levels[codes] * absmax[torch.arange(w.numel()) // block]
        assert torch.equal(dequantize_nf4(q).flatten(), flat_decode)


def test_padding_is_invisible():
    """100 values: one block of 64 and a last block of 36 that behaves as if padded with zeros."""
    torch.manual_seed(3)
    w = torch.randn(4, 25)
    q = quantize_nf4(w, double_quant=False)
    assert q.data.numel() == 50 and q.absmax.numel() == 2
    assert q.absmax[1] == w.flatten()[64:].abs().max()
    out = dequantize_nf4(q)
    assert out.shape == (4, 25)
    head, tail = quantize_nf4(w.flatten()[:64], double_quant=False), quantize_nf4(w.flatten()[64:], double_quant=False)
    torch.testing.assert_close(out.flatten(), torch.cat([dequantize_nf4(head), dequantize_nf4(tail)]), rtol=0, atol=0)
    # an odd count leaves a spare low nibble holding the code of 0.0 (7)
    odd = quantize_nf4(torch.randn(3, 3), double_quant=False)
    assert odd.data.numel() == 5 and int(odd.data[-1]) & 15 == 7
    # the error stays within half the widest gap between levels, times the block's absmax
    worst = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2
    assert float((out - w).abs().flatten()[64:].max()) <= worst * float(q.absmax[1]) + 1e-6


def test_bits_per_param():
    w = torch.randn(256, 1024)
    assert bits_per_param(quantize_nf4(w, double_quant=False)) == 4.5  # 4 + 32 bits / 64 values
    # 4 + 8 / 64 + 32 / (64 * 256) + 32 bits of offset / 262,144 values
    assert bits_per_param(quantize_nf4(w)) == pytest.approx(4.127, abs=5e-4)


def test_state_dict_round_trip_and_device(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(4)
    for dq in (True, False):
        q = quantize_nf4(torch.randn(9, 70, dtype=torch.bfloat16), 32, dq)
        path = tmp_path / f"w{dq}.safetensors"
        safetensors.save_file(q.state_dict(), path)
        back = NF4Weight.from_state_dict(safetensors.load_file(path))
        assert (back.shape, back.dtype, back.block_size, back.double_quant) == ((9, 70), torch.bfloat16, 32, dq)
        assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))
    moved = q.to("meta")
    assert all(t.device.type == "meta" for t in (moved.data, moved.absmax)) and q.data.device.type == "cpu"


def test_bad_inputs_are_refused():
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN or Inf .*flat index 197"):
        quantize_nf4(w)
    with pytest.raises(CheckpointError, match="1 of its values are NaN or Inf"):
        quantize_nf4(torch.tensor([1.0, float("inf"), 2.0]))
    for block in (48, 16, 0, 8192, True):
        with pytest.raises(ConfigError, match="power of two from 32 to 4096"):
            quantize_nf4(torch.randn(64), block_size=block)
    with pytest.raises(ConfigError, match="floating-point"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ConfigError, match="empty"):
        quantize_nf4(torch.randn(0, 64))
    good = quantize_nf4(torch.randn(64)).state_dict()
    with pytest.raises(CheckpointError, match="missing absmax"):
        NF4Weight.from_state_dict({k: v for k, v in good.items() if k != "absmax"})
    with pytest.raises(CheckpointError, match="data should be 32 uint8 bytes, is 31"):
        NF4Weight.from_state_dict({**good, "data": good["data"][:31]})


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tiles_are_the_whole_weight_bit_for_bit(double_quant, dtype):
    """Any tile of rows and block-aligned columns equals that part of dequantize_nf4's weight exactly
    (the fused product's input), through one reused scratch."""
    torch.manual_seed(5)
    q = quantize_nf4(torch.randn(48, 256) * 0.03, block_size=32, double_quant=double_quant)
    whole = dequantize_nf4(q, dtype)
    absmax, scratch = block_absmax(q), TileScratch()
    assert tiles_by_row_blocks(q)
    for rows, cols in [((0, 48), (0, 256)), ((5, 17), (0, 256)), ((0, 48), (64, 160)), ((47, 48), (224, 256))]:
        tile = dequantize_nf4_tile(q, rows, cols, dtype, absmax, scratch)
        assert tile.dtype == dtype and torch.equal(tile, whole[rows[0]:rows[1], cols[0]:cols[1]])
    first = dequantize_nf4_tile(q, (0, 4), (0, 256), dtype, absmax, scratch)
    dequantize_nf4_tile(q, (4, 8), (0, 256), dtype, absmax, scratch)
    assert torch.equal(first, whole[4:8])  # a view of the scratch: valid until the next tile, as documented


def test_tiles_must_cut_whole_blocks():
    q = quantize_nf4(torch.randn(8, 128), block_size=64)
    absmax, scratch = block_absmax(q), TileScratch()
    with pytest.raises(ConfigError, match="whole blocks"):
        dequantize_nf4_tile(q, (0, 8), (32, 128), torch.float32, absmax, scratch)
    with pytest.raises(ConfigError, match="whole blocks"):
        dequantize_nf4_tile(q, (0, 9), (0, 128), torch.float32, absmax, scratch)
    odd = quantize_nf4(torch.randn(8, 96), block_size=64)  # rows of 1.5 blocks
    assert not tiles_by_row_blocks(odd)
    with pytest.raises(ConfigError, match="dequantize the whole weight"):
        dequantize_nf4_tile(odd, (0, 2), (0, 96), torch.float32, block_absmax(odd), scratch)
