"""loratune/hub/export.py and ``loratune merge``: a merged model as a Hugging Face directory.

The exported directory is read back with ``transformers.AutoModelForCausalLM`` (and
``AutoTokenizer``) unchanged; its logits must equal our merged model's to 1e-4 (absolute, float32)
and its greedy generations ours token for token.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPT_IDS, randomize_lora_, rel_err
from safetensors import safe_open
from safetensors.torch import load_file

from loratune.adapters.lora import LoRAConfig, merge_lora
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.cli import main
from loratune.errors import CheckpointError, ConfigError
from loratune.generate import SamplingConfig, generate
from loratune.hub import export as export_module
from loratune.hub.export import parse_size, save_hf_model, shard_state
from loratune.models import load_model

ATOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.cat([torch.tensor([PROMPT_IDS]), torch.randint(0, 50257, (1, 9), generator=gen)], dim=1)


def _auto(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _merge(tiny_ckpt, adapter: Path, out: Path, *extra: str) -> int:
    return main(["merge", "--model", str(tiny_ckpt), "--adapter", str(adapter), "--out", str(out), *extra])


def _merged_ours(tiny_ckpt, adapter: Path):
    model, _ = load_model(tiny_ckpt)
    load_adapter(model, adapter)
    assert merge_lora(model) > 0
    return model


@pytest.fixture(scope="module")
def merged(tiny_ckpt, tmp_path_factory) -> SimpleNamespace:
    """An adapter on q, v (slices) and mlp.fc with random weights, merged by the CLI into ``out``."""
    root = tmp_path_factory.mktemp("merge")
    model, _ = load_model(tiny_ckpt)
    cfg = LoRAConfig(r=4, alpha=16, targets=["q", "v", "mlp.fc"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=31, std=0.5)
    save_adapter(model, root / "adapter", cfg, base_model=str(tiny_ckpt))
    assert _merge(tiny_ckpt, root / "adapter", root / "out") == 0
    return SimpleNamespace(root=root, adapter=root / "adapter", out=root / "out")


# --- the exported directory ---------------------------------------------------------------------

def test_merged_model_loads_in_transformers_with_our_logits(merged, tiny_ckpt):
    from transformers import GPT2LMHeadModel

    hf = _auto(merged.out)
    assert type(hf) is GPT2LMHeadModel and next(hf.parameters()).dtype == torch.float32
    ours = _merged_ours(tiny_ckpt, merged.adapter)
    unmerged, _ = load_model(tiny_ckpt)
    load_adapter(unmerged, merged.adapter)
    ids = _ids()
    with torch.no_grad():
        actual, expected = hf(ids).logits, ours(ids)
        base = _auto(tiny_ckpt)(ids).logits
        torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(actual, unmerged(ids), rtol=0, atol=ATOL)
    assert rel_err(actual, base) > 1e-2, "the merged adapter must change the logits"
    reloaded, _ = load_model(merged.out)  # and loratune reads its own export
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), expected, rtol=0, atol=ATOL)


def test_greedy_generation_agrees_token_for_token(merged, tiny_ckpt):
    hf = _auto(merged.out)
    ours = _merged_ours(tiny_ckpt, merged.adapter)
    prompt = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                             pad_token_id=50256)[0, prompt.shape[1]:].tolist()
    mine = generate(ours, prompt, SamplingConfig(max_new_tokens=24), eos_ids=[50256])[0].tolist()
    if 50256 in mine:
        mine = mine[:mine.index(50256) + 1]  # transformers stops after eos; we pad with it
    assert len(set(mine)) > 3, "the continuation should be varied for the comparison to mean something"
    assert mine == theirs


def test_export_holds_config_weights_tokenizer_and_generation_config(merged, tiny_ckpt, tokenizer):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    names = sorted(p.name for p in merged.out.iterdir())
    assert names == ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "vocab.json"]
    for name in ("vocab.json", "merges.txt"):
        assert (merged.out / name).read_bytes() == (tiny_ckpt / name).read_bytes()
    config = AutoConfig.from_pretrained(merged.out)
    assert (config.model_type, config.n_embd, config.n_layer, config.vocab_size) == ("gpt2", 64, 2, 50257)
    assert json.loads((merged.out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    gen = GenerationConfig.from_pretrained(merged.out)
    assert (gen.bos_token_id, gen.eos_token_id) == (50256, 50256)
    text = "today i messed up when"
    assert AutoTokenizer.from_pretrained(merged.out).encode(text) == tokenizer.encode(text)
    # the same tensor names and shapes transformers writes for this model (the tied head left out)
    ours = load_file(merged.out / "model.safetensors")
    theirs = load_file(tiny_ckpt / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items() if k != "lm_head.weight"}
    assert all(".lora_" not in k for k in ours)


def test_merge_of_a_peft_adapter_equals_peft_merge_and_unload(tmp_path, tiny_ckpt):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(_auto(tiny_ckpt), LoraConfig(r=4, lora_alpha=16, fan_in_fan_out=True,
                                                       target_modules=["c_attn", "c_proj"], use_rslora=True))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft.save_pretrained(tmp_path / "adapter")
    assert _merge(tiny_ckpt, tmp_path / "adapter", tmp_path / "out") == 0
    reference = peft.merge_and_unload().eval()
    ids = _ids()
    with torch.no_grad():
        expected = reference(ids).logits
        assert rel_err(expected, _auto(tiny_ckpt)(ids).logits) > 1e-2
        torch.testing.assert_close(_auto(tmp_path / "out")(ids).logits, expected, rtol=0, atol=ATOL)


def test_small_max_shard_size_writes_shards_and_an_index(merged, tiny_ckpt, tmp_path):
    out = tmp_path / "sharded"
    assert _merge(tiny_ckpt, merged.adapter, out, "--max-shard-size", "1MB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    single = load_file(merged.out / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(single) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for shard in shards:
        tensors = load_file(out / shard)
        assert all(index["weight_map"][k] == shard for k in tensors)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 10**6
        for k, t in tensors.items():
            assert torch.equal(t, single[k]), k
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_auto(out)(ids).logits, _auto(merged.out)(ids).logits, rtol=0, atol=0)


def test_out_dtype_bfloat16_writes_bf16_tensors(merged, tiny_ckpt, tmp_path):
    out = tmp_path / "bf16"
    assert _merge(tiny_ckpt, merged.adapter, out, "--out-dtype", "bfloat16") == 0
    single = load_file(merged.out / "model.safetensors")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(single)
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.bfloat16, key
            assert torch.equal(tensor, single[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = _auto(out)  # transformers' default dtype ("auto") follows config.json
    assert next(hf.parameters()).dtype == torch.bfloat16
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(hf.transformer.h[0].attn.c_attn.weight, single[key].to(torch.bfloat16))
    with torch.no_grad():
        logits = hf(_ids()).logits.float()
        expected = _auto(merged.out)(_ids()).logits
    assert rel_err(logits, expected) < 0.05  # bf16 weights: close, not equal


# --- refusals: nothing written half-way -----------------------------------------------------------

def _cli_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("loratune merge: error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("loratune merge: error: ")


def test_merge_into_a_non_empty_directory_is_refused(merged, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    message = _cli_error(capsys, _merge(tiny_ckpt, merged.adapter, out))
    assert message == f"--out {out} exists and is not empty (it holds notes.txt): choose a new --out"
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory is fine
    assert _merge(tiny_ckpt, merged.adapter, empty) == 0
    assert (empty / "model.safetensors").is_file()


def test_merge_with_a_bad_adapter_or_size_writes_nothing(merged, tiny_ckpt, tmp_path, capsys):
    missing = tmp_path / "no-adapter"
    message = _cli_error(capsys, _merge(tiny_ckpt, missing, tmp_path / "out"))
    assert message == f"adapter directory {missing} does not exist"
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    for p in merged.adapter.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    assert "is not a readable safetensors file" in _cli_error(capsys, _merge(tiny_ckpt, bad, tmp_path / "out"))
    message = _cli_error(capsys, _merge(tiny_ckpt, merged.adapter, tmp_path / "out", "--max-shard-size", "lots"))
    assert message == "cannot read size 'lots'; use e.g. 2GB, 500MB or 1GiB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-adapter"], "no output and no temporary directory"


def test_save_hf_model_refuses_unmerged_adapters(tiny_ckpt, model, tmp_path):
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=["qkv"]))
    with pytest.raises(CheckpointError, match="unmerged LoRA layers: merge them before exporting"):
        save_hf_model(model, tmp_path / "out", tokenizer_dir=tiny_ckpt)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_partial_directory_and_keeps_the_previous_one(tiny_ckpt, model, tmp_path,
                                                                             monkeypatch):
    previous = save_hf_model(model, tmp_path / "out", tokenizer_dir=tiny_ckpt)
    files = {p.name: p.read_bytes() for p in previous.iterdir()}
    calls = []

    def fail_on_second_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        Path(path).write_bytes(b"shard")

    monkeypatch.setattr(export_module, "save_file", fail_on_second_shard)
    for target in ("out", "fresh"):
        calls.clear()
        with pytest.raises(OSError, match="No space left"):
            save_hf_model(model, tmp_path / target, tokenizer_dir=tiny_ckpt, max_shard_size="1MB")
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary or half-written directory"
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == files


# --- helpers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("10kib", 10 * 2**10),
    ("1 MB", 10**6), ("4096", 4096), (123, 123),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "0MB", "-1GB", "2XB", ""])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ConfigError, match="cannot read size"):
        parse_size(text)


def test_shard_state_keeps_order_and_limits():
    state = {name: torch.zeros(n, dtype=torch.float32) for name, n in
             [("a", 10), ("b", 10), ("c", 30), ("d", 5), ("e", 1)]}  # 40, 40, 120, 20, 4 bytes
    shards = shard_state(state, max_bytes=80)
    assert [list(s) for s in shards] == [["a", "b"], ["c"], ["d", "e"]]  # c alone: bigger than a shard
    assert shard_state(state, max_bytes=10**6) == [state]
