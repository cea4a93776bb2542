"""loratune/runtime/finite.py: the one finite-weights check, for every floating dtype a file can hold."""

from __future__ import annotations

import pytest
import torch

from loratune.errors import CheckpointError
from loratune.runtime.finite import check_finite, first_non_finite

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_float_dtype_is_checked(dtype):
    """float8 tensors have no isfinite kernel (the long fuzz run crashed on them with
    NotImplementedError): they are checked through float32, exactly."""
    good, bad = torch.ones(3).to(dtype), torch.tensor([1.0, float("nan"), 2.0]).to(dtype)
    assert first_non_finite([good, good]) is None
    assert first_non_finite([good, torch.zeros(2, dtype=torch.int64), bad]) == 2  # integers are skipped
    with pytest.raises(CheckpointError, match=r"adapter in X: tensor b holds NaN/Inf values; do Y"):
        check_finite({"a": good, "b": bad}, "adapter in X", "do Y")


@pytest.mark.parametrize("where", [0, 3 * 2**20 + 17, -1], ids=["first-chunk", "middle-chunk", "last-element"])
def test_a_large_tensor_is_checked_in_chunks_to_its_last_element(where):
    """Past a million elements the check goes a chunk at a time (a 1B model's embedding would otherwise add
    2 GB of temporaries to the loading peak): a NaN anywhere, the last partial chunk included, is found."""
    t = torch.zeros(5 * 2**20 + 3, dtype=torch.bfloat16)
    assert first_non_finite([torch.ones(3), t]) is None
    t[where] = float("nan")
    assert first_non_finite([torch.ones(3), t]) == 1
