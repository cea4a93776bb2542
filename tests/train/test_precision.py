"""loratune/train/precision.py: ``precision: auto`` picks what is fast on the machine at hand."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from loratune.recipe import load_recipe
from loratune.runtime import device as device_module
from loratune.train import precision as precision_module
from loratune.train.loop import resolve_device
from loratune.train.precision import autocast_for, choose_precision, resolve_precision


@pytest.mark.parametrize("amx, expected", [(True, "bf16-true"), (False, "fp32")])
def test_auto_on_cpu_follows_amx(monkeypatch, amx, expected):
    monkeypatch.setattr(precision_module, "cpu_has_amx", lambda: amx)
    chosen, why = choose_precision(torch.device("cpu"))
    assert chosen == expected
    assert ("has AMX" in why) if amx else ("no AMX" in why and "slower than fp32" in why)


def test_an_explicit_precision_is_kept_without_a_reason():
    assert resolve_precision("bf16-mixed", torch.device("cpu")) == ("bf16-mixed", None)


def test_amx_detection_falls_back_to_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    real_path = device_module.Path  # the flags are read by runtime.device.cpu_flags
    monkeypatch.setattr(device_module, "Path", lambda p: flags if p == "/proc/cpuinfo" else real_path(p))
    assert precision_module.cpu_has_amx()
    flags.write_text("flags\t\t: fpu sse avx2\n")
    assert not precision_module.cpu_has_amx()


@pytest.mark.parametrize("amx", [True, False])
def test_the_recipe_default_is_auto_and_the_run_says_what_it_chose(monkeypatch, caplog, amx):
    monkeypatch.setattr(precision_module, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = load_recipe(None, [])
    assert recipe.precision == "auto" and recipe.device == "auto"
    with caplog.at_level(logging.INFO, logger="loratune"):
        resolved, device = resolve_device(recipe)
    assert device == torch.device("cpu") and resolved.precision == ("bf16-true" if amx else "fp32")
    assert f"precision: auto -> {resolved.precision} (" in caplog.text and "device: auto -> cpu" in caplog.text
    assert resolved.device == "cpu"


def test_a_cuda_device_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from loratune.errors import ConfigError

    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        resolve_device(load_recipe(None, ["device=cuda"]))


def test_train_writes_the_concrete_precision(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_amx", lambda: False)
    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"text": "the cat sat on the mat and the dog ran away"}\n' for _ in range(12)))
    from loratune.train import train

    recipe = load_recipe(None, [f"model={ckpt}", f"data.source={data}", "data.text_field=text",
                                f"out_dir={tmp_path / 'out'}", "seq_len=8", "batch_size=4", "max_steps=1",
                                "sample_tokens=0", "data.val_fraction=0"])
    train(recipe, progress=False)
    written = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert written["precision"] == "fp32"


def test_autocast_only_for_bf16_mixed():
    assert isinstance(autocast_for("bf16-mixed", torch.device("cpu")), torch.autocast)
    assert not isinstance(autocast_for("bf16-true", torch.device("cpu")), torch.autocast)
