"""loratune/dist/world.py in one process: what a run without torchrun sees, how the environment torchrun
sets is read, and how a failed collective and a failure on one rank are reported."""

from __future__ import annotations

import pytest
import torch

from loratune.dist.world import SINGLE, LostRank, World, agree, dist_timeout, join_world, launched, rank_failures
from loratune.errors import ConfigError, DataError


def test_a_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched()
    world = join_world("auto")
    assert world is SINGLE and world.main and not world.distributed
    assert world.sum([1.5, 2.0]) == [1.5, 2.0]
    assert world.any(True) and not world.any(False)
    assert world.broadcast_int(7) == 7
    world.barrier()


def test_bad_launcher_environment_is_a_config_error(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="set by torchrun"):
        join_world("cpu")


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf", "1e300"])
def test_a_bad_dist_timeout_is_refused_before_any_process_group(monkeypatch, value):
    """LORATUNE_DIST_TIMEOUT=soon was a ValueError on every rank; now one line saying what to give."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LORATUNE_DIST_TIMEOUT", value)
    with pytest.raises(ConfigError, match=r"LORATUNE_DIST_TIMEOUT=.*a number > 0"):
        join_world("cpu")
    assert not torch.distributed.is_initialized()


def test_dist_timeout_reads_seconds(monkeypatch):
    monkeypatch.delenv("LORATUNE_DIST_TIMEOUT", raising=False)
    assert dist_timeout() == 600
    monkeypatch.setenv("LORATUNE_DIST_TIMEOUT", " 90.5 ")
    assert dist_timeout() == 90.5


def test_each_rank_device():
    world = World(rank=1, size=2, local_rank=1, distributed=True)
    assert world.device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            world.device("cuda")
        assert world.device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not supported in a distributed run"):
        world.device("mps")


def test_agree_raises_the_failing_ranks_error_and_returns_the_result():
    assert agree(SINGLE, lambda: 3, "testing") == 3

    def fails():
        raise DataError("the data set is empty")

    with pytest.raises(DataError, match="empty"):
        agree(SINGLE, fails, "loading the data")


def test_a_lost_peer_becomes_a_clear_error_only_in_a_launched_run():
    launched_world = World(rank=0, size=2, distributed=True)
    with pytest.raises(LostRank, match="lost contact with the other ranks.*--resume"):
        with rank_failures(launched_world):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    with pytest.raises(RuntimeError, match="Connection reset"):  # one process: not ours to explain
        with rank_failures(SINGLE):
            raise RuntimeError("Connection reset by peer")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a communication failure
        with rank_failures(launched_world):
            raise RuntimeError("shape mismatch")
