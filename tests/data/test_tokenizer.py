"""loratune/data/tokenizer.py: GPT-2 byte-level BPE, equal to transformers' tokenizer id for id."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import DATA_FILE, EOS_ID
from hypothesis import given, settings
from hypothesis import strategies as st

from loratune.data.tokenizer import load_tokenizer
from loratune.errors import CheckpointError

FIXED = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "multiple   spaces\tand\ttabs\n\nand blank lines\n",
    "I'm sure it's what they'd've wanted, isn't it?",
    "unicode: café naïve Ünïcödé — “quotes” ½ ∑ 日本語のテキスト 한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "code: def f(x):\n    return x ** 2  # square\r\n",
    "numbers 3.14159 1,000,000 2024-01-31",
    "two docs<|endoftext|>joined by end-of-text",
    "",
]


def _reddit_texts(n: int = 5) -> list[str]:
    if not DATA_FILE.is_file():
        pytest.skip(f"real-text sample {DATA_FILE} is not present")
    texts = []
    with DATA_FILE.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            texts += [record["documents"], record.get("tldr", "")]
            if len(texts) >= 2 * n:
                break
    return [t for t in texts if t]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_ckpt):
    from transformers import GPT2TokenizerFast

    # transformers 5's constructor takes vocab/merges *contents*; from_pretrained reads the files
    return GPT2TokenizerFast.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def test_eos_and_vocab_size(ours, hf_tokenizer):
    assert ours.eos_id == EOS_ID == hf_tokenizer.eos_token_id
    assert ours.vocab_size == 50257
    assert ours.encode("<|endoftext|>") == [EOS_ID]


@pytest.mark.parametrize("text", FIXED, ids=range(len(FIXED)))
def test_fixed_strings_equal_transformers(ours, hf_tokenizer, text):
    ids = ours.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert ours.decode(ids) == text


def test_known_ids(ours):
    """Pinned ids from GPT-2's vocabulary, independent of any other tokenizer implementation."""
    assert ours.encode("Hello world") == [15496, 995]
    assert ours.encode(" The quick brown fox") == [383, 2068, 7586, 21831]
    assert ours.decode([464, 2068, 7586, 21831]) == "The quick brown fox"


def test_real_texts_equal_transformers(ours, hf_tokenizer):
    texts = _reddit_texts()
    assert len(texts) >= 5
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf_tokenizer.encode(text)
        assert ours.decode(ids) == text
    assert ours.encode_batch(texts) == [hf_tokenizer.encode(t) for t in texts]


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_decode_encode_round_trip(ours, text):
    assert ours.decode(ours.encode(text)) == text


def test_tokenizer_json_loads_and_matches(tmp_path, hf_tokenizer, ours):
    hf_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    from_json = load_tokenizer(tmp_path)
    assert from_json.eos_id == EOS_ID
    for text in FIXED:
        assert from_json.encode(text) == ours.encode(text)
        assert from_json.decode(from_json.encode(text)) == text


def test_missing_or_broken_tokenizer_files(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    shutil.copy(tiny_ckpt / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="no tokenizer"):  # merges.txt missing
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="could not read the tokenizer"):
        load_tokenizer(tmp_path)


# --- special tokens: found as transformers finds them (the real families: test_tokenizer_families.py) ----

def test_gpt2_adds_no_special_tokens(ours, hf_tokenizer):
    """GPT-2 has no BOS: transformers' tokenizer(text) adds nothing, and neither does encode(add_special=True)."""
    assert ours.bos_id is None and ours.eos_ids == (EOS_ID,) and ours.pad_id == EOS_ID
    for text in FIXED:
        assert ours.encode(text, add_special=True) == ours.encode(text) == hf_tokenizer(text)["input_ids"]
    assert ours.encode_batch(FIXED, add_special=True) == ours.encode_batch(FIXED)
    assert ours.decode([EOS_ID, 15496], skip_special=True) == hf_tokenizer.decode([EOS_ID, 15496], skip_special_tokens=True)


def test_eos_from_config_json_when_the_tokenizer_names_none(tmp_path, tiny_ckpt):
    """Without tokenizer_config.json's eos_token, config.json's eos_token_id decides."""
    shutil.copyfile(tiny_ckpt / "vocab.json", tmp_path / "vocab.json")
    shutil.copyfile(tiny_ckpt / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "unknown-family", "eos_token_id": 13}))
    assert load_tokenizer(tmp_path).eos_id == 13
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "unknown-family"}))
    assert load_tokenizer(tmp_path).eos_id == EOS_ID  # a known family's end-of-text token in the vocabulary


def test_eos_ids_add_generation_config_and_config_ids(tmp_path, tiny_ckpt):
    """Generation stops on the tokenizer's eos, then every eos_token_id of generation_config.json and
    config.json (an int or a list; out-of-vocabulary ids dropped), each once."""
    shutil.copyfile(tiny_ckpt / "vocab.json", tmp_path / "vocab.json")
    shutil.copyfile(tiny_ckpt / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [13, EOS_ID, 10**9]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 198}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == EOS_ID and tok.eos_ids == (EOS_ID, 13, 198)
