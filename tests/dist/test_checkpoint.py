"""loratune/dist/checkpoint.py in one process: a sharded (DCP, safetensors) checkpoint holds the trainable
tensors and AdamW moments by name, loads back exactly, holds no pickle, and damage is a clear error."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from loratune.adapters.lora import LoRAConfig
from loratune.adapters.targets import inject_lora
from loratune.adapters.trainable import set_trainable
from loratune.dist.checkpoint import load_sharded, save_sharded
from loratune.dist.world import SINGLE, World
from loratune.errors import CheckpointError
from loratune.models import load_model


def _lora_model(ckpt, seed: int):
    torch.manual_seed(seed)
    model, _ = load_model(ckpt)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    set_trainable(model, "lora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _trained(ckpt, seed: int = 0):
    model, opt = _lora_model(ckpt, seed)
    x = torch.randint(0, 100, (2, 8))
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_weights_moments_and_rng(tiny_ckpt, tmp_path):
    model, opt = _trained(tiny_ckpt)
    rng = torch.get_rng_state()
    groups = save_sharded(tmp_path, model, opt, SINGLE)
    assert groups[0]["lr"] == 1e-2 and "params" not in groups[0]
    files = sorted((tmp_path / "dcp").glob("*.safetensors"))
    assert files and not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob(".metadata"))
    with safe_open(str(files[0]), framework="pt") as f:
        names = set(f.keys())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"model.{n}" for n in trainable} <= names and not any("c_fc.weight" in n for n in names)

    fresh, fresh_opt = _lora_model(tiny_ckpt, seed=1)  # other LoRA weights, no optimizer state
    torch.manual_seed(123)
    assert load_sharded(tmp_path, fresh, fresh_opt, groups, SINGLE, saved_world=1)
    assert torch.equal(torch.get_rng_state(), rng)
    theirs = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name
    for p, q in zip(opt.param_groups[0]["params"], fresh_opt.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])


def test_another_world_size_keeps_the_weights_but_not_the_rng(tiny_ckpt, tmp_path):
    model, opt = _trained(tiny_ckpt)
    groups = save_sharded(tmp_path, model, opt, SINGLE)
    fresh, fresh_opt = _lora_model(tiny_ckpt, seed=1)
    assert not load_sharded(tmp_path, fresh, fresh_opt, groups, SINGLE, saved_world=2)


def test_other_recipe_and_damage_are_clear_errors(tiny_ckpt, tmp_path):
    model, opt = _trained(tiny_ckpt)
    groups = save_sharded(tmp_path, model, opt, SINGLE)
    torch.manual_seed(0)
    other, _ = load_model(tiny_ckpt)
    inject_lora(other, LoRAConfig(r=4, alpha=8, targets=["q", "k", "v"]))
    set_trainable(other, "lora")
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(CheckpointError, match="lacks .* trainable tensors"):
        load_sharded(tmp_path, other, other_opt, groups, SINGLE, saved_world=1)
    shard = next((tmp_path / "dcp").glob("*.safetensors"))
    shard.write_bytes(b"not a safetensors file")
    fresh, fresh_opt = _lora_model(tiny_ckpt, seed=1)
    with pytest.raises(CheckpointError, match="damaged"):
        load_sharded(tmp_path, fresh, fresh_opt, groups, SINGLE, saved_world=1)


def test_a_failed_write_is_an_os_error_and_another_rank_is_a_checkpoint_error(tiny_ckpt, tmp_path):
    model, opt = _trained(tiny_ckpt)
    (tmp_path / "dcp").write_text("a file where the shards go")
    with pytest.raises(OSError, match="writing the shards failed"):
        save_sharded(tmp_path, model, opt, SINGLE)
    good = tmp_path / "good"
    groups = save_sharded(good, model, opt, SINGLE)
    torch.manual_seed(0)
    wider, _ = load_model(tiny_ckpt)
    inject_lora(wider, LoRAConfig(r=8, alpha=16))  # the same tensor names, other shapes
    set_trainable(wider, "lora")
    wider_opt = torch.optim.AdamW([p for p in wider.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(CheckpointError, match="cannot read the sharded checkpoint"):
        load_sharded(good, wider, wider_opt, groups, SINGLE, saved_world=1)


def test_a_launched_run_refuses_a_single_process_checkpoint(tiny_ckpt, tmp_path):
    from loratune.train.checkpoint import TrainState, load_checkpoint, save_checkpoint

    model, opt = _trained(tiny_ckpt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = save_checkpoint(tmp_path, model, opt, sched, TrainState(step=2), keep=2)
    with pytest.raises(CheckpointError, match="single-process run.*without torchrun"):
        load_checkpoint(path, model, opt, sched, world=World(rank=0, size=2, distributed=True))
