"""loratune/hub/files.py and hub/resolve.py: loading never runs code and never leaves the directory it was given.

Pickles (pytorch_model.bin, adapter_model.bin, a checkpoint's optimizer.pt) are only read with
``weights_only=True``: the model one is tested in tests/models/test_gpt2.py, the optimizer one in
tests/train/test_resume.py, the adapter one here. A sharded index can name only files inside its
directory; a hub id has to look like one before anything is fetched.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratune.adapters.lora import LoRAConfig
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.errors import CheckpointError
from loratune.hub.files import read_state_dict
from loratune.hub.resolve import is_hub_id, resolve_model_dir
from loratune.models import load_model


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_malicious_adapter_pickle_is_refused_and_never_runs(tmp_path, model, tiny_ckpt):
    inject_lora(model, LoRAConfig(r=2, targets=["q", "v"]))
    d = save_adapter(model, tmp_path / "adapter", LoRAConfig(r=2, targets=["q", "v"]), base_model="tiny")
    tensors = load_file(d / "adapter_model.safetensors")
    marker = tmp_path / "pwned"
    tensors[next(iter(tensors))] = _Payload(marker)
    torch.save(tensors, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()  # only the pickle is left
    fresh, _ = load_model(tiny_ckpt)
    with pytest.raises(CheckpointError, match="refusing to load .*adapter_model.bin"):
        load_adapter(fresh, d)
    assert not marker.exists(), "loading the adapter executed code from the pickle"
    torch.load(d / "adapter_model.bin", weights_only=False)  # the payload is real
    assert marker.exists()


def test_a_plain_adapter_pickle_of_tensors_still_loads(tmp_path, model, tiny_ckpt):
    lora = LoRAConfig(r=2, targets=["q", "v"])
    inject_lora(model, lora)
    d = save_adapter(model, tmp_path / "adapter", lora, base_model="tiny")
    torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    fresh, _ = load_model(tiny_ckpt)
    assert load_adapter(fresh, d).r == 2


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "../outside.safetensors", "/ABS/outside.safetensors",
                                   "link.safetensors"])
def test_a_sharded_index_cannot_name_files_outside_its_directory(tmp_path, tiny_ckpt, shard):
    outside = tmp_path / "outside.safetensors"
    save_file(load_file(tiny_ckpt / "model.safetensors"), str(outside))  # a real, readable file
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True)
    shutil.copy(tiny_ckpt / "config.json", d / "config.json")
    (d.parent / "outside.safetensors").symlink_to(outside)
    (d / "link.safetensors").symlink_to(outside)  # a link inside that points out
    shard = shard.replace("/ABS", str(tmp_path))
    names = list(load_file(outside))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(CheckpointError, match="names a shard outside the checkpoint directory"):
        read_state_dict(d)
    with pytest.raises(CheckpointError, match="names a shard outside"):
        load_model(d)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"a": ["x"]}, {"a": None}, {"a": "x\0y"}, {"a": ""}])
def test_a_malformed_index_is_a_checkpoint_error(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="has no 'weight_map' object mapping tensor names to shard file names"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("name", ["../gpt2", "a/b/c", "a/../b", "a/..", "-x", ".hidden/x", "x y", "gpt2/",
                                  "/no/such/dir", "~/x", "a\\b", "aaa/b:c"])
def test_only_hub_shaped_ids_are_fetched(name, monkeypatch):
    def no_download(repo_id: str):
        raise AssertionError(f"tried to download {repo_id!r}")

    monkeypatch.setattr("loratune.hub.resolve.download", no_download)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_dir(name)
    assert is_hub_id("gpt2") and is_hub_id("openai-community/gpt2") and not is_hub_id(name)
