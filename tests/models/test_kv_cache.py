"""loratune/models/kv_cache.py: the row and position moves the server's engine makes through the cache's own
methods (copy a prefilled row in, move a row, shift rows in time, a view of the first rows), checked against the
same moves written on the tensors."""

from __future__ import annotations

import pytest
import torch

from loratune.models.kv_cache import KVCache


def _cache(batch: int = 3, max_len: int = 10, windows=None) -> KVCache:
    cache = KVCache(2, batch, 2, max_len, 4, torch.float32, torch.device("cpu"), windows=windows)
    gen = torch.Generator().manual_seed(0)
    for t in [*cache.k, *cache.v]:
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.tokens.copy_(torch.randint(0, 100, cache.tokens.shape, generator=gen))
    return cache


def test_nbytes_counts_every_layers_keys_and_values():
    assert _cache().nbytes() == 2 * 2 * (3 * 2 * 10 * 4) * 4


def test_copy_row_writes_a_prefilled_prompt_right_aligned():
    dst, src = _cache(), _cache(batch=2, max_len=6)
    before = [t.clone() for t in dst.k]
    dst.copy_row(1, src, 0, start=2, n=4, at=5)
    for layer in range(2):
        torch.testing.assert_close(dst.k[layer][1, :, 5:9], src.k[layer][0, :, 2:6])
        torch.testing.assert_close(dst.v[layer][1, :, 5:9], src.v[layer][0, :, 2:6])
        torch.testing.assert_close(dst.k[layer][0], before[layer][0])  # other rows untouched
    assert torch.equal(dst.tokens[1, 5:9], src.tokens[0, 2:6])


def test_move_row_copies_the_positions_in_use_only():
    cache = _cache()
    cache.length = 6
    before = [t.clone() for t in cache.k]
    cache.move_row(2, 0)
    for layer in range(2):
        torch.testing.assert_close(cache.k[layer][0, :, :6], before[layer][2, :, :6])
        torch.testing.assert_close(cache.k[layer][0, :, 6:], before[layer][0, :, 6:])


@pytest.mark.parametrize("by", [3, -2])
def test_shift_moves_the_first_rows_in_time(by):
    cache = _cache()
    cache.length = 6
    before = [t.clone() for t in cache.v]
    cache.shift(by, rows=2)
    assert cache.length == 6 + by
    src, dst = slice(max(0, -by), 6), slice(max(0, by), 6 + by)
    for layer in range(2):
        torch.testing.assert_close(cache.v[layer][:2, :, dst], before[layer][:2, :, src])
        torch.testing.assert_close(cache.v[layer][2], before[layer][2])  # rows past ``rows`` stay


def test_first_rows_is_a_view_whose_writes_land_in_the_cache():
    cache = _cache()
    cache.length = 4
    view = cache.first_rows(2)
    k = torch.ones((2, 2, 1, 4))
    view.update(0, k, k)
    view.advance(1)
    assert view.length == 5 and cache.length == 4  # its own length: the engine copies it back
    torch.testing.assert_close(cache.k[0][:2, :, 4], torch.ones((2, 2, 4)))


def test_ring_buffer_layers_cannot_be_moved_in_time():
    cache = _cache(windows=[None, 4])
    with pytest.raises(ValueError, match="rings=False"):
        cache.shift(1, rows=1)
