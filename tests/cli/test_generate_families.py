"""`loratune generate` on modern families with their real tokenizers: the text equals what
transformers generates greedily (AutoTokenizer + AutoModelForCausalLM) for 48 new tokens,
BOS and stop tokens handled as transformers handles them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from family_models import save_family
from loratune.cli import main

TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"
PROMPT = "Today I messed up when I tried to cook"


@pytest.mark.parametrize("case, tokenizer, vocab", [("qwen3", "qwen3", 151936), ("llama", "llama3_1", 128256),
                                                    ("gemma3", "gemma3", 262144), ("mistral", "llama2", 32000)])
@pytest.mark.slow
def test_cli_greedy_text_equals_transformers(tmp_path, capsys, case, tokenizer, vocab):
    src = TOKENIZERS / tokenizer
    if not src.is_dir():
        pytest.skip(f"{src} is not present (../shared holds the real tokenizers)")
    from transformers import AutoTokenizer

    d = tmp_path / case
    hf = save_family(case, d, vocab_size=vocab, num_hidden_layers=2, layer_types=None,
                     **({"pad_token_id": 0} if case == "gemma3" else {}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, d / name)
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id or 0)[0, ids.shape[1]:]
    assert len(out) >= 40 and len(set(out.tolist())) >= 8  # a long, varied continuation
    expected = tok.decode(out, skip_special_tokens=False)
    assert main(["generate", "--model", str(d), "--prompt", PROMPT, "--max-new-tokens", "48"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_gemma3_added_token_past_the_embedding_is_refused_only_in_text(tmp_path, capsys):
    """Gemma 3's tokenizer lists <image_soft_token> at id 262,144, one past the text model's
    embedding: the pair loads (as in transformers), and only a prompt naming it is refused."""
    src = TOKENIZERS / "gemma3"
    if not src.is_dir():
        pytest.skip(f"{src} is not present (../shared holds the real tokenizers)")
    d = tmp_path / "gemma"
    save_family("gemma3", d, vocab_size=262144, num_hidden_layers=2, layer_types=None, pad_token_id=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, d / name)
    assert main(["generate", "--model", str(d), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(d), "--prompt", "a <image_soft_token> b", "--max-new-tokens", "3"]) == 2
    assert "'<image_soft_token>' (id 262144), a token this model has no embedding row for" in capsys.readouterr().err
