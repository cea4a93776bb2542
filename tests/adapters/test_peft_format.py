"""loratune/adapters/peft_format.py: adapters in the PEFT format, out to PEFT and in from PEFT, and bad input.

Every parity check runs the real ``peft`` and ``transformers`` packages on the tiny checkpoint, in
float32, to 1e-5 relative to the logits' magnitude, and first checks that the adapter changes the
output (a zero adapter would make any comparison pass).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import PROMPT_IDS, hf_tiny, randomize_lora_, rel_err
from loratune.adapters import peft_format as adapter_module
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.cli import main
from loratune.errors import CheckpointError
from loratune.adapters.lora import WHOLE, LoRAConfig, adapters_disabled, lora_layers
from loratune.models import GPT2, GPT2Config, load_model
from loratune.adapters.trainable import set_trainable
from loratune.adapters.targets import inject_lora

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.tensor([PROMPT_IDS]), torch.randint(0, 50257, (1, 9), generator=gen)], dim=1)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _hf(tiny_ckpt):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_ckpt).eval()


def _train_a_few_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """A short AdamW loop on random tokens, so A and B are trained values, not an initialisation."""
    set_trainable(model, "lora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        logits = model(ids[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert all(b.abs().max() > 0 for _, m in lora_layers(model) for b in m.lora_B.values()), "B must have trained"


def _peft_lora_modules(peft_model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA-wrapped modules under the base model's own names (transformer.h.0.attn.c_attn ...)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _assert_same_layers(ours: torch.nn.Module, peft_model) -> None:
    """The same modules adapted, with the same rank (PEFT's view) and the same scale in each."""
    theirs = _peft_lora_modules(peft_model)
    layers = dict(lora_layers(ours))
    assert set(layers) == set(theirs)
    for name, layer in layers.items():
        assert layer.scale == pytest.approx(theirs[name].scaling["default"], rel=1e-12), name
        assert len(layer.slices) * layer.r == theirs[name].r["default"], name


# --- round trip out: trained here, read by PEFT -----------------------------------------------

OUT_CASES = {
    "qkv": dict(targets=["qkv"]),
    "q,v slices": dict(targets=["q", "v"]),
    "mlp.fc,mlp.proj,attn.out": dict(targets=["mlp.fc", "mlp.proj", "attn.out"]),
    "rslora q,v slices": dict(targets=["q", "v"], rslora=True),
    "q,v + mlp.fc (rank_pattern)": dict(targets=["q", "v", "mlp.fc"]),
    "rslora q,v + mlp.fc (rank_pattern)": dict(targets=["q", "v", "mlp.fc"], rslora=True),
}


@pytest.mark.parametrize("case", OUT_CASES)
def test_trained_adapter_gives_the_same_logits_in_peft(case, tmp_path, tiny_ckpt, model):
    from peft import PeftModel

    cfg = LoRAConfig(r=4, alpha=16, **OUT_CASES[case])
    inject_lora(model, cfg)
    _train_a_few_steps(model)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tiny_ckpt))
    peft = PeftModel.from_pretrained(_hf(tiny_ckpt), tmp_path / "adapter").eval()
    _assert_same_layers(model, peft)
    ids = _ids()
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        with peft.disable_adapter():
            base = peft(input_ids=ids).logits
        actual = model(ids)
    assert rel_err(expected, base) > 1e-3, "the adapter must change the logits"
    _close(actual, expected)


def test_mixed_ranks_write_rank_and_alpha_patterns_that_peft_honours(tmp_path, tiny_ckpt, model):
    from peft import PeftModel

    cfg = LoRAConfig(r=4, alpha=16, targets=["q", "v", "mlp.fc"], rslora=True)
    inject_lora(model, cfg)
    randomize_lora_(model, seed=2, std=0.5)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tiny_ckpt))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # c_attn carries q and v: rank 2r, alpha * sqrt(2) (rsLoRA); c_fc keeps rank r and alpha
    assert (config["r"], config["lora_alpha"]) == (8, pytest.approx(16 * math.sqrt(2)))
    assert config["rank_pattern"] == {rf"transformer\.h\.{i}\.mlp\.c_fc": 4 for i in range(2)}
    assert config["alpha_pattern"] == {rf"transformer\.h\.{i}\.mlp\.c_fc": 16.0 for i in range(2)}
    peft = PeftModel.from_pretrained(_hf(tiny_ckpt), tmp_path / "adapter")
    modules = _peft_lora_modules(peft)
    for i in range(2):
        c_attn, c_fc = modules[f"transformer.h.{i}.attn.c_attn"], modules[f"transformer.h.{i}.mlp.c_fc"]
        assert (c_attn.r["default"], c_fc.r["default"]) == (8, 4)
        assert c_attn.scaling["default"] == pytest.approx(c_fc.scaling["default"]) == pytest.approx(cfg.scale)


def test_adapter_config_and_tensors_are_peft_format(tmp_path, tiny_ckpt, model):
    from peft import LoraConfig

    cfg = LoRAConfig(r=4, alpha=32, dropout=0.05, targets=["q", "v"])  # the tutorial's adapter
    inject_lora(model, cfg)
    randomize_lora_(model, seed=3)
    out = save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tiny_ckpt))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "loratune_adapter.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    expected = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(tiny_ckpt),
                "r": 8, "lora_alpha": 64.0, "lora_dropout": 0.05, "target_modules": ["c_attn"],
                "fan_in_fan_out": True, "use_rslora": False, "bias": "none"}
    assert {k: config[k] for k in expected} == expected
    assert config["lora_alpha"] / config["r"] == cfg.scale  # the same scale as q and v's r=4, alpha=32

    tensors = load_file(out / "adapter_model.safetensors")
    C = model.config.n_embd
    names = [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{w}.weight" for i in range(2) for w in "AB"]
    assert sorted(tensors) == sorted(names)
    for i, block in enumerate(model.transformer.h):
        layer = block.attn.c_attn
        A = tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight"]
        B = tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight"]
        assert (A.shape, B.shape, A.dtype, B.dtype) == ((8, C), (3 * C, 8), torch.float32, torch.float32)
        torch.testing.assert_close(A, torch.cat([layer.lora_A["q"], layer.lora_A["v"]]), rtol=0, atol=0)
        expected_B = torch.zeros(3 * C, 8)
        expected_B[:C, :4], expected_B[2 * C:, 4:] = layer.lora_B["q"], layer.lora_B["v"]  # k rows stay zero
        torch.testing.assert_close(B, expected_B, rtol=0, atol=0)
        torch.testing.assert_close(B @ A * config["lora_alpha"] / config["r"], layer.delta_weight(),
                                   rtol=1e-6, atol=1e-7)

    parsed = LoraConfig.from_pretrained(out)
    assert (parsed.peft_type.value, parsed.task_type, parsed.r, parsed.lora_alpha) == ("LORA", "CAUSAL_LM", 8, 64.0)
    assert set(parsed.target_modules) == {"c_attn"} and parsed.fan_in_fan_out and not parsed.use_rslora


def test_gpt2_124m_width_keys_and_shapes(tmp_path):
    """The shapes docs/adapters.md states for GPT-2 (hidden 768): A (r, 768), B (2304, r)."""
    model = GPT2(GPT2Config(n_embd=768, n_layer=2, n_head=12, n_positions=16, vocab_size=97)).init_weights()
    cfg = LoRAConfig(r=4, alpha=32, targets=["qkv"])
    inject_lora(model, cfg)
    save_adapter(model, tmp_path / "adapter", cfg, base_model="gpt2")
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items()}
    assert shapes == {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{w}.weight": s
                      for i in range(2) for w, s in (("A", (4, 768)), ("B", (2304, 4)))}


def test_reload_restores_q_v_slices_with_identical_tensors(tmp_path, tiny_ckpt, model):

    cfg = LoRAConfig(r=4, alpha=32, targets=["q", "v"], rslora=True)
    inject_lora(model, cfg)
    randomize_lora_(model, seed=5, std=0.4)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tiny_ckpt))
    fresh, _ = load_model(tiny_ckpt)
    assert load_adapter(fresh, tmp_path / "adapter") == cfg
    saved, loaded = dict(lora_layers(model)), dict(lora_layers(fresh))
    assert set(loaded) == set(saved) == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}
    for name, layer in loaded.items():
        C = model.config.n_embd
        assert layer.slices == {"q": (0, C), "v": (2 * C, 3 * C)}
        assert (layer.r, layer.alpha, layer.rslora, layer.scale) == (4, 32.0, True, saved[name].scale)
        for which in ("lora_A", "lora_B"):
            for s in "qv":
                assert torch.equal(getattr(layer, which)[s], getattr(saved[name], which)[s]), (name, which, s)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_slices_changed_by_peft_load_as_the_whole_projection(tmp_path, tiny_ckpt, model):
    """Our metadata names q and v slices, but PEFT trained the k rows too: load what PEFT computes."""
    from peft import PeftModel

    cfg = LoRAConfig(r=4, alpha=16, targets=["q", "v"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=6, std=0.4)
    adapter = save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tiny_ckpt))
    peft = PeftModel.from_pretrained(_hf(tiny_ckpt), adapter, is_trainable=True).eval()
    C = model.config.n_embd
    with torch.no_grad():
        for module in _peft_lora_modules(peft).values():
            module.lora_B["default"].weight[C:2 * C] += 0.1  # the k rows, zero in our layout
    peft.save_pretrained(adapter)  # PEFT rewrites its files; loratune_adapter.json stays
    assert (adapter / "loratune_adapter.json").is_file()
    fresh, _ = load_model(tiny_ckpt)
    loaded = load_adapter(fresh, adapter)
    assert all(list(m.slices) == [WHOLE] and m.r == 8 for _, m in lora_layers(fresh))
    # the settings returned are those of the adapter loaded (r=8, alpha=32 on c_attn), not our q,v ones
    assert (loaded.r, loaded.alpha, loaded.targets) == (8, 32.0, ["c_attn"])
    ids = _ids()
    with torch.no_grad():
        _close(fresh(ids), peft(input_ids=ids).logits)


def test_train_command_writes_an_adapter_peft_loads(tmp_path, tiny_ckpt, capsys):
    from peft import PeftModel

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"today i tried fix number {i} and it broke."}) + "\n"
                            for i in range(16)), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_ckpt}\nout_dir: {tmp_path / 'run'}\nmax_steps: 2\nbatch_size: 4\n"
                      "seq_len: 16\nlr: 0.01\nsample_tokens: 2\nlora:\n  r: 2\n  alpha: 8\n  targets: [q, v]\n"
                      f"data:\n  source: {data}\n  text_field: text\n", encoding="utf-8")
    assert main(["train", str(recipe), "--no-progress"]) == 0, capsys.readouterr().err
    adapter = tmp_path / "run" / "adapter"
    ours, _ = load_model(tiny_ckpt)
    load_adapter(ours, adapter)
    assert [list(m.slices) for _, m in lora_layers(ours)] == [["q", "v"], ["q", "v"]]
    peft = PeftModel.from_pretrained(_hf(tiny_ckpt), adapter).eval()
    ids = _ids()
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        with peft.disable_adapter():
            assert rel_err(expected, peft(input_ids=ids).logits) > 1e-3, "two steps must have moved B"
        _close(ours(ids), expected)


# --- round trip in: made by PEFT, loaded here ---------------------------------------------------

def _peft_made_adapter(tiny_ckpt, out: Path, seed: int = 0, hf=None, **lora_kwargs):
    """Save an adapter the way PEFT users do, with random non-zero A and B; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    kwargs = dict(r=4, lora_alpha=16, fan_in_fan_out=True, lora_dropout=0.0, target_modules=["c_attn"])
    peft = get_peft_model(hf if hf is not None else _hf(tiny_ckpt), LoraConfig(**{**kwargs, **lora_kwargs}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in _peft_lora_modules(peft).values():
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
            A.copy_(torch.randn(A.shape, generator=gen) / math.sqrt(A.shape[1]))
            B.copy_(torch.randn(B.shape, generator=gen) * 0.3 / math.sqrt(B.shape[1]))
    peft.eval()
    peft.save_pretrained(out)
    return peft


IN_CASES = {
    "c_attn list": dict(),
    "regex string": dict(target_modules=r".*\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)"),
    "rslora": dict(use_rslora=True, target_modules=["c_attn", "c_proj"]),
    "layers_to_transform=[1]": dict(layers_to_transform=[1]),
    "rank_pattern/alpha_pattern": dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8,
                                       rank_pattern={"mlp.c_proj": 2}, alpha_pattern={"h.1.attn.c_attn": 24}),
    "exclude_modules": dict(target_modules=["c_attn", "c_fc"], exclude_modules=["transformer.h.0.mlp.c_fc"]),
    "adapter_model.bin": dict(save="bin"),
}


@pytest.mark.parametrize("case", IN_CASES)
def test_peft_made_adapter_gives_peft_logits_here(case, tmp_path, tiny_ckpt, model):
    kwargs = dict(IN_CASES[case])
    pickled = kwargs.pop("save", None) == "bin"
    peft = _peft_made_adapter(tiny_ckpt, tmp_path / "adapter", seed=7, **kwargs)
    if pickled:
        tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
        torch.save(tensors, tmp_path / "adapter" / "adapter_model.bin")  # what safe_serialization=False writes
    lora = load_adapter(model, tmp_path / "adapter", base_model=str(tiny_ckpt))
    _assert_same_layers(model, peft)
    if case == "layers_to_transform=[1]":
        assert [n for n, _ in lora_layers(model)] == ["transformer.h.1.attn.c_attn"]
    if case == "exclude_modules":
        assert "transformer.h.0.mlp.c_fc" not in dict(lora_layers(model))
    assert (lora.r, lora.alpha, lora.rslora) == (peft.peft_config["default"].r,
                                                  peft.peft_config["default"].lora_alpha,
                                                  peft.peft_config["default"].use_rslora)
    ids = _ids()
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        with peft.disable_adapter():
            base = peft(input_ids=ids).logits
        actual = model(ids)
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids), base, rtol=RTOL, atol=RTOL * base.abs().max().item())
    assert rel_err(expected, base) > 1e-3
    _close(actual, expected)


def test_peft_made_adapter_loads_onto_transformers_gpt2_too(tmp_path, tiny_ckpt):
    """The loader works on any module tree with the Hugging Face names, e.g. transformers' own GPT-2."""
    peft = _peft_made_adapter(tiny_ckpt, tmp_path / "adapter", seed=8)
    hf = _hf(tiny_ckpt)
    load_adapter(hf, tmp_path / "adapter")
    assert all(m.fan_in_fan_out for _, m in lora_layers(hf)) and len(list(lora_layers(hf))) == 2
    ids = _ids()
    with torch.no_grad():
        _close(hf(ids).logits, peft(input_ids=ids).logits)


def test_pickled_adapter_is_read_weights_only(tmp_path, tiny_ckpt, model):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": Payload()},
               tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*adapter_model.bin"):
        load_adapter(model, tmp_path / "adapter")
    assert not marker.exists(), "unpickling must not run code"
    torch.save([torch.zeros(2)], tmp_path / "adapter" / "adapter_model.bin")  # plain tensors, but not a dict
    with pytest.raises(CheckpointError, match="adapter_model.bin does not hold a dict of tensors"):
        load_adapter(model, tmp_path / "adapter")
    assert not list(lora_layers(model))


# --- CLI: generate and eval accept a PEFT-made adapter ----------------------------------------

def test_generate_command_with_peft_adapter_prints_peft_greedy_text(tmp_path, tiny_ckpt, tokenizer, capsys):
    peft = _peft_made_adapter(tiny_ckpt, tmp_path / "adapter", seed=9)
    prompt = "The quick brown fox"
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        new = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=12, pad_token_id=tokenizer.eos_id)[0, ids.shape[1]:].tolist()
        with peft.disable_adapter():
            base = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=12, pad_token_id=tokenizer.eos_id)[0, ids.shape[1]:].tolist()
    assert new != base, "the adapter should change the greedy continuation"
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    code = main(["generate", "--model", str(tiny_ckpt), "--adapter", str(tmp_path / "adapter"),
                 "--prompt", prompt, "--max-new-tokens", "12"])
    assert code == 0
    assert capsys.readouterr().out == tokenizer.decode(new) + "\n"


def test_eval_command_with_peft_adapter_reports_peft_loss(tmp_path, tiny_ckpt, tokenizer, capsys):
    peft = _peft_made_adapter(tiny_ckpt, tmp_path / "adapter", seed=10)
    texts = ["today i broke the kettle and then the toaster.", "my cat found the keyboard again"]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text) + [tokenizer.eos_id]])
            logits = peft(input_ids=ids[:, :-1]).logits
            total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    code = main(["eval", "--model", str(tiny_ckpt), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
                 "--text-field", "text", "--seq-len", "64", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["examples"], result["tokens"]) == (2, count)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5, abs=2e-6)


# --- bad input ------------------------------------------------------------------------------------

def _error(model, adapter, match: str, **kwargs) -> None:
    """load_adapter must raise a CheckpointError matching ``match`` and leave the model untouched."""
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
    with pytest.raises(CheckpointError, match=match):
        load_adapter(model, adapter, **kwargs)
    assert not list(lora_layers(model)), "a failed load must not leave the model half adapted"
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_adapter_for_another_hidden_size_is_refused(tmp_path, tiny_ckpt, model):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter", hf=hf_tiny(seed=1, n_embd=32))
    _error(model, tmp_path / "adapter", r"transformer\.h\.0\.attn\.c_attn have shapes A \(4, 32\), B \(96, 4\); "
                                        r"this model's layer is 64 -> 192: the adapter was made for a base model of "
                                        r"another shape")


def test_adapter_for_another_architecture_is_refused(tmp_path, model):
    adapter = tmp_path / "llama-adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "some/llama"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"base_model.model.model.layers.0.self_attn.{m}.lora_{w}.weight": torch.zeros(4, 64) if w == "A"
               else torch.zeros(64, 4) for m in ("q_proj", "v_proj") for w in "AB"},
              str(adapter / "adapter_model.safetensors"))
    _error(model, adapter, r"adapter targets modules this model does not have: model\.layers\.0\.self_attn\.q_proj"
                           r".*another architecture")


def test_tensors_for_a_module_the_model_lacks_are_refused(tmp_path, tiny_ckpt, model):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.update({k.replace(".h.1.", ".h.5."): v.clone() for k, v in tensors.items() if ".h.1." in k})  # 6th layer
    save_file(tensors, str(path))
    _error(model, tmp_path / "adapter", r"does not have: transformer\.h\.5\.attn\.c_attn")


def test_config_and_weights_must_name_the_same_modules(tmp_path, tiny_ckpt, model):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", target_modules=["c_attn", "c_fc"])  # config says c_fc too, weights do not
    _error(model, tmp_path / "adapter", r"adapter_config targets transformer\.h\.0\.mlp\.c_fc.*no tensors for them")
    _edit_config(tmp_path / "adapter", target_modules=["c_attn"], layers_to_transform=[0])  # weights for h.1 too
    _error(model, tmp_path / "adapter", r"the weights hold tensors for transformer\.h\.1\.attn\.c_attn, which "
                                        r"adapter_config does not target")


def test_a_bad_layer_after_good_ones_leaves_the_model_untouched(tmp_path, tiny_ckpt, model):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_{}.weight"
    tensors[key.format("A")], tensors[key.format("B")] = torch.zeros(3, 64), torch.zeros(192, 3)
    save_file(tensors, str(path))
    _error(model, tmp_path / "adapter", r"transformer\.h\.1\.attn\.c_attn have rank 3, adapter_config says 4")


def test_missing_adapter_weights(tmp_path, tiny_ckpt, model):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    _error(model, tmp_path / "adapter", r"adapter weights not found in .*adapter: expected adapter_model\.safetensors")
    shutil.rmtree(tmp_path / "adapter")
    _error(model, tmp_path / "adapter", r"adapter directory .*adapter does not exist")


def test_corrupted_safetensors_header(tmp_path, tiny_ckpt, model):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[:12] = b"\xff" * 12  # the header length and the start of the JSON header
    path.write_bytes(bytes(data))
    _error(model, tmp_path / "adapter", r"adapter_model\.safetensors is not a readable safetensors file")


def test_unknown_config_keys_are_accepted_with_a_warning(tmp_path, tiny_ckpt, model, caplog):
    peft = _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", some_future_option={"x": 1}, another_one=True)
    with caplog.at_level("WARNING", logger="loratune"):
        load_adapter(model, tmp_path / "adapter")
    assert "ignoring unknown adapter_config keys another_one, some_future_option" in caplog.text
    with torch.no_grad():
        _close(model(_ids()), peft(input_ids=_ids()).logits)


@pytest.mark.parametrize("change, match", [
    (dict(use_dora=True), r"says use_dora=True but the weights lack a DoRA magnitude"),
    (dict(lora_bias=True), r"LoRA bias terms \(lora_bias\) is not supported"),
    (dict(peft_type="IA3"), r"peft_type is 'IA3'; only LORA adapters are supported"),
    (dict(bias="lora_only"), r"bias='lora_only' adapters \(trained biases\) are not supported"),
    (dict(modules_to_save=["lm_head"]), r"modules_to_save \['lm_head'\].*not supported"),
    (dict(r=0), r"r must be a positive integer, got 0"),
], ids=["dora without magnitudes", "lora_bias", "ia3", "bias", "modules_to_save", "r=0"])
def test_unsupported_adapters_are_refused(change, match, tmp_path, tiny_ckpt, model):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", **change)
    _error(model, tmp_path / "adapter", match)


def test_differing_base_model_warns(tmp_path, tiny_ckpt, model, caplog):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    with caplog.at_level("WARNING", logger="loratune"):
        load_adapter(model, tmp_path / "adapter", base_model="my/other-gpt2")
    assert f"adapter was trained on {str(tiny_ckpt)!r}, applying it to 'my/other-gpt2'" in caplog.text
    assert len(list(lora_layers(model))) == 2


def test_hub_id_that_cannot_be_fetched_is_a_clear_error(model):
    _error(model, "nobody-here/no-such-adapter", r"could not fetch adapter 'nobody-here/no-such-adapter'")


def test_bad_adapter_on_the_command_line_is_exit_2(tmp_path, tiny_ckpt, capsys):
    _peft_made_adapter(tiny_ckpt, tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", use_dora=True)
    code = main(["generate", "--model", str(tiny_ckpt), "--adapter", str(tmp_path / "adapter"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "loratune generate: error: " in err and "weights lack a DoRA magnitude" in err


# --- saving is atomic -------------------------------------------------------------------------

def test_save_replaces_an_existing_adapter_directory(tmp_path, tiny_ckpt, model):
    old = tmp_path / "adapter"
    old.mkdir()
    (old / "stale.txt").write_text("from an earlier run")
    cfg = LoRAConfig(r=2, alpha=4, targets=["qkv"])
    inject_lora(model, cfg)
    save_adapter(model, old, cfg, base_model=str(tiny_ckpt))
    assert sorted(p.name for p in old.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "loratune_adapter.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_failed_save_leaves_no_partial_directory_and_keeps_the_previous_one(tmp_path, tiny_ckpt, model,
                                                                           monkeypatch):
    cfg = LoRAConfig(r=2, alpha=4, targets=["q", "v"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=12)
    previous = save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tiny_ckpt))
    files = {p.name: p.read_bytes() for p in previous.iterdir()}

    def disk_full(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")  # what an interrupted write leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_module, "save_file", disk_full)
    randomize_lora_(model, seed=13)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tiny_ckpt))
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, tmp_path / "fresh", cfg, base_model=str(tiny_ckpt))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temporary or half-written directory"
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == files


NAMES = ["transformer.h.3.attn.c_attn", "model.layers.3.mlp.experts.7.w1", "model.layers.12.self_attn.q_proj",
         "model.decoder.layers.0.blocks.5.fc", "h.2.attn.c_attn", "encoder.layer.1.attention.output.dense.11.x"]


@pytest.mark.parametrize("layers, pattern", [([7], None), ([3], None), ([3], "layers"), ([5], "blocks"),
                                             ([0, 5], ["layers", "blocks"]), (2, None), ([11], None)])
def test_layer_selection_follows_peft_exactly(layers, pattern):
    """layers_to_transform picks the layer index the way the installed PEFT's own check does, on names with
    several numbers (PEFT 0.21's regexes are lazy: 'model.layers.3.mlp.experts.7.w1' is layer 3, not 7)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from loratune.adapters.peft_config import is_targeted

    targets = ["c_attn", "w1", "q_proj", "fc", "x"]
    peft_config = LoraConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    ours = {"target_modules": targets, "layers_to_transform": layers, "layers_pattern": pattern}
    for name in NAMES:
        assert is_targeted(ours, name) == bool(check_target_module_exists(peft_config, name)), name
