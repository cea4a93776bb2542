"""loratune/models/gpt2.py, models/__init__.py and checkpoint.py: parity with transformers' GPT-2,
the KV cache, and every way a checkpoint directory can be wrong."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPT_IDS, hf_tiny
from loratune.errors import CheckpointError
from loratune.models import GPT2, GPT2Config, load_model

ATOL = 1e-4  # max abs logit difference vs transformers, float32


def _ids(B: int = 2, T: int = 40, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (B, T), generator=gen)


def _copy_ckpt(src: Path, dst: Path, weights: bool = True) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if weights or not f.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy(f, dst / f.name)
    return dst


# --- parity with transformers ----------------------------------------------------------------

@torch.no_grad()
def test_logits_equal_transformers(model, hf_model):
    ids = _ids()
    ours, ref = model(ids), hf_model(ids).logits
    assert ours.shape == ref.shape == (2, 40, 50257)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("overrides", [
    dict(activation_function="gelu"),
    dict(scale_attn_by_inverse_layer_idx=True),
    dict(n_inner=96),
    dict(layer_norm_epsilon=1e-3, activation_function="gelu_pytorch_tanh"),
], ids=lambda d: ",".join(d))
@torch.no_grad()
def test_config_variants_equal_transformers(tmp_path, overrides):
    hf = hf_tiny(seed=2, **overrides)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    for key, value in overrides.items():
        assert getattr(ours.config, key) == value
    ids = _ids(B=1, T=24, seed=2)
    torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=ATOL)


@torch.no_grad()
def test_left_padded_batch_equals_transformers_on_real_tokens(model, hf_model):
    pad = 50256
    rows = [PROMPT_IDS + [1110, 290, 340], PROMPT_IDS[:4], [50, 51, 52, 53, 54, 55, 56, 57, 58]]
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    # transformers' forward numbers positions 0..T-1 unless told; generate() passes these
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf_model(ids, attention_mask=mask, position_ids=position_ids).logits
    ours = model(ids, attention_mask=mask)
    assert torch.isfinite(ours).all(), "pad rows must not produce NaN"
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=ATOL)
    # and each real row equals the same prompt run alone, unpadded
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r]))[0]
        torch.testing.assert_close(ours[i, T - len(r):], alone, rtol=0, atol=ATOL)


@torch.no_grad()
def test_kv_cache_forward_equals_full_forward(model):
    ids = _ids(B=2, T=30, seed=1)
    full = model(ids)
    cache = model.new_cache(batch=2, max_len=30)
    parts = [model(ids[:, :10], cache=cache)]  # prefill
    parts += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 20)]  # one token at a time
    parts.append(model(ids[:, 20:30], cache=cache))  # a chunk after cached positions
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=ATOL)


@torch.no_grad()
def test_kv_cache_with_left_padding_equals_full_forward(model):
    ids = _ids(B=2, T=16, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(batch=2, max_len=16)
    parts = [model(ids[:, :8], cache=cache, attention_mask=mask[:, :8])]
    parts += [model(ids[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1]) for t in range(8, 16)]
    out = torch.cat(parts, dim=1)
    torch.testing.assert_close(out[mask.bool()], full[mask.bool()], rtol=0, atol=ATOL)


def test_sequence_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, model.config.n_positions + 1, dtype=torch.long))


@torch.no_grad()
def test_to_hf_state_dict_round_trips_into_transformers(model, hf_model):
    state = model.to_hf_state_dict()
    assert "lm_head.weight" not in state
    for k, v in hf_model.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(state[k], v), k
    config = GPT2Config.from_hf(model.config.to_hf())
    assert config == model.config


def test_load_in_bfloat16(tiny_ckpt, model):
    bf16, _ = load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.lm_head.weight is bf16.transformer.wte.weight
    with torch.no_grad():
        ids = _ids(B=1, T=8)
        torch.testing.assert_close(bf16(ids).float(), model(ids), rtol=0.05, atol=0.1)


# --- checkpoint layouts that must load -------------------------------------------------------

def _assert_same_model(loaded: GPT2, reference: GPT2) -> None:
    ref = reference.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_gpt2model_keys_without_prefix_load(tmp_path, tiny_ckpt, model):
    """The hub's 'gpt2' stores GPT2Model keys (h.0..., wte...) plus causal-mask buffers."""
    d = _copy_ckpt(tiny_ckpt, tmp_path / "bare", weights=False)
    state = {k.removeprefix("transformer."): v for k, v in load_file(tiny_ckpt / "model.safetensors").items()}
    assert "h.0.attn.c_attn.weight" in state
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    loaded, path = load_model(d)
    assert path == d
    _assert_same_model(loaded, model)


def test_sharded_checkpoint_loads(tmp_path, model, hf_model):
    d = tmp_path / "sharded"
    hf_model.save_pretrained(d, max_shard_size="2MB")
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    assert len(list(d.glob("model-*.safetensors"))) >= 2
    loaded, _ = load_model(d)
    _assert_same_model(loaded, model)


def test_pytorch_model_bin_loads_with_weights_only(tmp_path, tiny_ckpt, model):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "bin", weights=False)
    torch.save(load_file(tiny_ckpt / "model.safetensors"), d / "pytorch_model.bin")
    loaded, _ = load_model(d)
    _assert_same_model(loaded, model)


class _Payload:
    """Unpickling this runs a shell command: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny_ckpt):
    marker = tmp_path / "pwned"
    d = _copy_ckpt(tiny_ckpt, tmp_path / "evil", weights=False)
    state = load_file(tiny_ckpt / "model.safetensors")
    state["transformer.h.0.ln_1.weight"] = _Payload(marker)
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(d)
    assert not marker.exists(), "loading the checkpoint executed code from the pickle"
    # the payload is real: an unsafe load would have run it
    torch.load(d / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_bin_without_tensor_dict_is_refused(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "list", weights=False)
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="dict of tensors"):
        load_model(d)


# --- checkpoints that must fail with a clear message -----------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_unreachable_hub_id_is_a_checkpoint_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not fetch model 'loratune-tests/no-such-model'"):
        load_model("loratune-tests/no-such-model")


def test_file_instead_of_directory(tiny_ckpt):
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(tiny_ckpt / "config.json")


def test_missing_config(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(d)


def test_other_architecture_is_refused_by_name(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "mamba")
    (d / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"],
                                               "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="mamba") as info:
        load_model(d)
    assert "MambaForCausalLM" in str(info.value) and "gpt2" in str(info.value) and "qwen3" in str(info.value)


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "gpt2", "n_embd": 64,', "not valid JSON"),
    ("[1, 2, 3]", "JSON object"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_invalid_config_json(tmp_path, tiny_ckpt, text, message):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "badjson")
    path = d / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(d)
    assert "config.json" in str(info.value)


def test_invalid_config_values(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "badvalues")
    config = json.loads((d / "config.json").read_text())
    config.update(n_embd=64, n_head=5)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not divisible by n_head=5"):
        load_model(d)


def test_truncated_safetensors(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(d)


def test_missing_weights_file(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "noweights", weights=False)
    with pytest.raises(CheckpointError, match="no weights") as info:
        load_model(d)
    assert "model.safetensors" in str(info.value)


def test_wrong_shapes_name_the_tensor(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "shapes")
    config = json.loads((d / "config.json").read_text())
    config["n_embd"] = 32  # the weights are 64 wide
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape .*config.json implies"):
        load_model(d)


def test_missing_and_unexpected_tensors_are_listed(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "keys", weights=False)
    state = load_file(tiny_ckpt / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensors") as info:
        load_model(d)
    assert "h.1.mlp.c_fc.bias" in str(info.value) and "rotary" in str(info.value)


def test_integer_weights_are_refused(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "ints", weights=False)
    state = load_file(tiny_ckpt / "model.safetensors")
    state["transformer.ln_f.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="ln_f.weight has dtype torch.int32"):
        load_model(d)


def test_shard_outside_the_directory_is_refused(tmp_path, tiny_ckpt):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "escape", weights=False)
    shutil.copy(tiny_ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.wte.weight": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_model(d)
