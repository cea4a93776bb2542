"""config.json of a merged export (loratune/hub/export.py, ``loratune merge``) and which weights file is read.

The export keeps the base checkpoint's config.json, changing only the weights' dtype, a missing
``architectures`` and loratune's record of the merged adapters; merging an adapter that record
lists already is refused unless ``--allow-repeat``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import randomize_lora_
from loratune.adapters.lora import LoRAConfig
from loratune.adapters.peft_format import save_adapter
from loratune.adapters.targets import inject_lora
from loratune.cli import main
from loratune.hub.export import export_config, save_hf_model
from loratune.hub.files import read_state_dict, sha256_file
from loratune.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
CHANGED = {"torch_dtype", "dtype", "loratune"}  # the fields a merge may change or add


def _adapter(base: Path, out: Path, seed: int) -> Path:
    model, _ = load_model(base)
    cfg = LoRAConfig(r=2, alpha=4, targets=["q", "v"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=seed, std=0.5)
    return save_adapter(model, out, cfg, base_model=str(base))


def _merge(base: Path, adapter: Path, out: Path, *extra: str) -> int:
    return main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), *extra])


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory) -> SimpleNamespace:
    """A base checkpoint whose config.json has dropout 0.1 and an unknown key, two adapters, one merge."""
    root = tmp_path_factory.mktemp("export-config")
    base = root / "base"
    shutil.copytree(tiny_ckpt, base)
    config = _config(base)
    config["my_tool_settings"] = {"keep": [1, 2, 3]}
    (base / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    first, second = _adapter(base, root / "first", seed=1), _adapter(base, root / "second", seed=2)
    assert _merge(base, first, root / "merged") == 0
    return SimpleNamespace(root=root, base=base, first=first, second=second, merged=root / "merged")


# --- case 1: the base config survives ---------------------------------------------------------------

def test_merge_keeps_every_base_config_field(setup):
    from transformers import AutoConfig

    base, merged = _config(setup.base), _config(setup.merged)
    assert base["attn_pdrop"] == base["resid_pdrop"] == base["embd_pdrop"] == 0.1
    assert {k: v for k, v in merged.items() if k not in CHANGED} == {k: v for k, v in base.items()
                                                                     if k not in CHANGED}
    assert merged["dtype"] == merged["torch_dtype"] == "float32"
    loaded = AutoConfig.from_pretrained(setup.merged)
    assert (loaded.attn_pdrop, loaded.resid_pdrop, loaded.embd_pdrop) == (0.1, 0.1, 0.1)
    assert loaded.my_tool_settings == {"keep": [1, 2, 3]}


def test_out_dtype_updates_both_dtype_fields_and_nothing_else(setup):
    out = setup.root / "bf16"
    assert _merge(setup.base, setup.second, out, "--out-dtype", "bfloat16") == 0
    base, merged = _config(setup.base), _config(out)
    assert merged["dtype"] == merged["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in merged.items() if k not in CHANGED} == {k: v for k, v in base.items()
                                                                     if k not in CHANGED}


def test_export_config_fills_in_missing_architectures_only(model):
    base = {"model_type": "gpt2", "attn_pdrop": 0.1, "n_embd": 64}
    config = export_config(model, base, torch.float16)
    assert config == {**base, "architectures": model.config.to_hf()["architectures"], "torch_dtype": "float16"}
    assert base == {"model_type": "gpt2", "attn_pdrop": 0.1, "n_embd": 64}, "the caller's dict is not changed"
    kept = export_config(model, {**base, "architectures": ["Custom"]}, torch.float32)
    assert kept["architectures"] == ["Custom"]


def test_without_a_base_config_the_models_own_config_is_written(model, tmp_path):
    """init-model has no base config.json: the typed config's to_hf() is the whole config."""
    out = save_hf_model(model, tmp_path / "out")
    assert _config(out) == {**model.config.to_hf(), "torch_dtype": "float32"}


# --- case 2: what was merged is recorded, and a repeat is refused ----------------------------------

def test_merge_records_the_adapter_and_transformers_still_loads(setup):
    from transformers import AutoModelForCausalLM

    record = _config(setup.merged)["loratune"]["merged_adapters"]
    assert record == [{"path": str(setup.first.resolve()),
                       "sha256": sha256_file(setup.first / "adapter_model.safetensors"),
                       "base_model": str(setup.base)}]
    hf = AutoModelForCausalLM.from_pretrained(setup.merged)
    assert hf.config.loratune["merged_adapters"][0]["sha256"] == record[0]["sha256"]


def test_merging_the_same_adapter_again_is_refused(setup, capsys):
    out = setup.root / "twice"
    capsys.readouterr()
    assert _merge(setup.merged, setup.first, out) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("loratune merge: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"adapter {setup.first.resolve()} is already merged into {setup.merged}" in lines[0]
    assert "--allow-repeat" in lines[0]
    assert not out.exists()
    copy = setup.root / "first-copy"  # the sha256 recognises it under another name too
    shutil.copytree(setup.first, copy)
    assert _merge(setup.merged, copy, out) == 2 and not out.exists()


def test_a_different_adapter_appends_and_allow_repeat_forces(setup):
    sha = [sha256_file(a / "adapter_model.safetensors") for a in (setup.first, setup.second)]
    assert _merge(setup.merged, setup.second, setup.root / "both") == 0
    entries = _config(setup.root / "both")["loratune"]["merged_adapters"]
    assert [e["sha256"] for e in entries] == sha
    assert entries[1]["base_model"] == str(setup.merged)
    assert _merge(setup.merged, setup.first, setup.root / "forced", "--allow-repeat") == 0
    entries = _config(setup.root / "forced")["loratune"]["merged_adapters"]
    assert [e["sha256"] for e in entries] == [sha[0], sha[0]]


# --- case 3: which weights file is read --------------------------------------------------------------

def test_safetensors_wins_over_a_pickle_and_the_log_says_so(tiny_ckpt, tmp_path, caplog):
    shutil.copyfile(tiny_ckpt / "model.safetensors", tmp_path / "model.safetensors")
    expected = read_state_dict(tmp_path)
    torch.save({k: torch.zeros_like(v) for k, v in expected.items()}, tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="loratune"):
        state = read_state_dict(tmp_path)
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    lines = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert lines == [f"{tmp_path} holds model.safetensors, pytorch_model.bin: reading model.safetensors, "
                     "ignoring pytorch_model.bin"]


def test_a_single_weights_file_logs_nothing(tiny_ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="loratune"):
        read_state_dict(tiny_ckpt)
    assert not [r for r in caplog.records if "ignoring" in r.getMessage()]
