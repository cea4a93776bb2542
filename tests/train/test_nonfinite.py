"""NaN/Inf weights: refused by name when a model, adapter or checkpoint is loaded or saved, and a
training step whose update makes a weight non-finite stops the run before anything corrupt is saved.

The training runs here are a few steps of batch 4 x 16 tokens on the tiny random GPT-2.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_
from safetensors.torch import load_file, save_file

import loratune.train.session
from loratune.adapters.lora import LoRAConfig
from loratune.adapters.peft_format import WEIGHTS_NAME, load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.adapters.trainable import set_trainable
from loratune.errors import CheckpointError, ConfigError
from loratune.runtime.finite import check_finite, first_non_finite
from loratune.models import load_model
from loratune.recipe import load_recipe
from loratune.train import TrainingStopped, train
from loratune.train.checkpoint import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from loratune.train.optim import make_optimizer, make_scheduler
from loratune.train.precision import autocast_for
from loratune.train.step import NonFiniteStep, train_step


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentences.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(64):
            f.write(json.dumps({"text": f"the red cat {i} runs to the park and sleeps in the park."}) + "\n")
    return path


def _recipe(ckpt: Path, data: Path, out: Path, *overrides: str):
    return load_recipe(None, [
        f"model={ckpt}", f"data.source={data}", "data.text_field=text", f"out_dir={out}", "seq_len=16",
        "batch_size=4", "max_steps=6", "lr=1e-2", "log_every=1", "eval_every=0", "save_every=1",
        "keep_checkpoints=2", "data.val_fraction=0", "sample_tokens=0", "precision=fp32", "device=cpu", *overrides])


def _lora_model(ckpt: Path):
    model, _ = load_model(ckpt)
    inject_lora(model, LoRAConfig(r=2, targets=["q", "v"]))
    set_trainable(model, "lora")
    return model


# --- the one check -------------------------------------------------------------------------------

def test_check_finite_names_the_first_bad_tensor():
    tensors = {"a": torch.zeros(3), "ids": torch.arange(4), "b": torch.tensor([1.0, float("inf")]),
               "c": torch.tensor([float("nan")])}
    with pytest.raises(CheckpointError) as info:
        check_finite(tensors, "model weights in DIR", "download it again")
    assert str(info.value) == "model weights in DIR: tensor b holds NaN/Inf values; download it again"
    assert first_non_finite(list(tensors.values())) == 2
    assert first_non_finite([torch.zeros(2), torch.arange(3)]) is None and first_non_finite([]) is None
    check_finite({"a": torch.ones(2, dtype=torch.bfloat16)}, "fine")  # no error


# --- training -------------------------------------------------------------------------------------

def test_a_step_that_makes_a_weight_inf_raises_and_skips_the_schedule(ckpt, data_file, tmp_path):
    recipe = _recipe(ckpt, data_file, tmp_path)
    model = _lora_model(ckpt)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, recipe.max_steps)
    optimizer.register_step_post_hook(lambda opt, args, kwargs: trainable[1].data.view(-1)[0].fill_(float("inf")))
    batch = {"input_ids": torch.randint(0, 1000, (4, 16))}
    batch["labels"] = batch["input_ids"].clone()
    with pytest.raises(NonFiniteStep) as info:
        train_step(model, batch, optimizer, scheduler, recipe, torch.device("cpu"),
                   autocast_for("fp32", torch.device("cpu")), trainable)
    assert (info.value.what, info.value.value) == ("weights", float("inf"))
    assert scheduler.last_epoch == 0 and all(p.grad is None for p in trainable)


def test_an_inf_weight_stops_training_at_the_last_good_checkpoint(ckpt, data_file, tmp_path, monkeypatch):
    """Step 4's update writes Inf into a LoRA weight: the run stops naming step 3's checkpoint, and
    nothing holding the Inf reaches the disk (no checkpoint, no adapter)."""
    real = loratune.train.session.make_optimizer
    calls = {"n": 0}

    def corrupting(model, recipe):
        optimizer = real(model, recipe)
        param = next(p for p in model.parameters() if p.requires_grad)

        def hook(opt, args, kwargs):
            calls["n"] += 1
            if calls["n"] == 4:
                with torch.no_grad():
                    param.view(-1)[0] = float("inf")
        optimizer.register_step_post_hook(hook)
        return optimizer

    monkeypatch.setattr(loratune.train.session, "make_optimizer", corrupting)
    with pytest.raises(TrainingStopped) as info:
        train(_recipe(ckpt, data_file, tmp_path), progress=False)
    last_good = tmp_path / "checkpoints" / "step-000003"
    assert re.match(r"weights became inf at step 4; stopping\. Last good checkpoint: " + re.escape(f"{last_good}."),
                    str(info.value)), str(info.value)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert kept == [tmp_path / "checkpoints" / "step-000002", last_good]
    for path in kept:
        assert all(torch.isfinite(t).all() for t in load_file(path / "trainable.safetensors").values()), path
    assert not (tmp_path / "adapter").exists()


def test_weight_decay_inf_is_refused_before_training(ckpt, data_file, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("weight_decay must be a finite number >= 0, got inf")):
        _recipe(ckpt, data_file, tmp_path, "weight_decay=inf")


# --- checkpoints ----------------------------------------------------------------------------------

def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_earlier_ones(ckpt, data_file, tmp_path):
    recipe = _recipe(ckpt, data_file, tmp_path)
    model = _lora_model(ckpt)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, recipe.max_steps)
    root = tmp_path / "checkpoints"
    first = save_checkpoint(root, model, optimizer, scheduler, TrainState(step=1), keep=2)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(root, model, optimizer, scheduler, TrainState(step=2), keep=2)
    assert str(info.value) == (f"refusing to save checkpoint {root / 'step-000002'}: tensor {name} holds NaN/Inf "
                               f"values; the last complete checkpoint is {first}")
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no temporary directory left either


def test_load_checkpoint_refuses_non_finite_weights(ckpt, data_file, tmp_path):
    recipe = _recipe(ckpt, data_file, tmp_path)
    model = _lora_model(ckpt)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, recipe.max_steps)
    path = save_checkpoint(tmp_path / "checkpoints", model, optimizer, scheduler, TrainState(step=1), keep=2)
    tensors = load_file(path / "trainable.safetensors")
    name = min(tensors)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(path / "trainable.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path}: tensor {name} holds NaN/Inf values")):
        load_checkpoint(path, model, optimizer, scheduler)


# --- models and adapters --------------------------------------------------------------------------

def _nan_model_dir(ckpt: Path, dest: Path, key: str = "transformer.h.0.attn.c_attn.weight") -> Path:
    shutil.copytree(ckpt, dest)
    tensors = load_file(dest / "model.safetensors")
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_load_model_refuses_nan_weights_by_name(ckpt, tmp_path):
    bad = _nan_model_dir(ckpt, tmp_path / "bad")
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    assert str(info.value).startswith(f"model weights in {bad}: tensor transformer.h.0.attn.c_attn.weight holds "
                                      "NaN/Inf values; the file is corrupt")


def test_load_model_in_float16_names_the_overflow(ckpt, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(ckpt, big)
    tensors = load_file(big / "model.safetensors")
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].clone()
    tensors["transformer.wpe.weight"][0, 0] = 1e6  # finite in float32, Inf in float16
    save_file(tensors, str(big / "model.safetensors"), metadata={"format": "pt"})
    load_model(big)  # float32: fine
    with pytest.raises(CheckpointError, match="tensor transformer.wpe.weight holds NaN/Inf values; its values "
                                              "overflow float16"):
        load_model(big, dtype=torch.float16)


def _adapter(ckpt: Path, dest: Path) -> tuple[Path, str]:
    model, _ = load_model(ckpt)
    cfg = LoRAConfig(r=2, targets=["q", "v"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=3)
    save_adapter(model, dest, cfg, base_model=str(ckpt))
    tensors = load_file(dest / WEIGHTS_NAME)
    return dest, min(tensors)


def test_load_adapter_refuses_nan_weights_by_name(ckpt, tmp_path):
    adapter, name = _adapter(ckpt, tmp_path / "adapter")
    tensors = load_file(adapter / WEIGHTS_NAME)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})
    model, _ = load_model(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(f"adapter weights in {adapter}: tensor {name} holds NaN/Inf")):
        load_adapter(model, adapter)
    assert set(model.state_dict()) == set(before)  # the model is left untouched


def test_save_adapter_refuses_nan_weights(ckpt, tmp_path):
    model, _ = load_model(ckpt)
    cfg = LoRAConfig(r=2, targets=["q", "v"])
    inject_lora(model, cfg)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".lora_B" in n).fill_(float("inf"))
    with pytest.raises(CheckpointError, match=r"refusing to save the adapter to .*: tensor base_model\.model\..*"
                                              r"lora_B\.weight holds NaN/Inf values"):
        save_adapter(model, tmp_path / "adapter", cfg, base_model=str(ckpt))
    assert not (tmp_path / "adapter").exists()
