"""loratune/data/tokenizer.py: GPT-2 byte-level BPE, equal to transformers' tokenizer id for id."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DATA_FILE, EOS_ID
from loratune.errors import CheckpointError
from loratune.data.tokenizer import load_tokenizer

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


# --- special tokens of other families: found as transformers finds them ---------------------------

SHARED_TOKENIZERS = DATA_FILE.parents[2] / "tokenizers"


@pytest.mark.parametrize("name", ["llama3_1", "llama2", "qwen3", "gemma3"])
def test_special_tokens_of_real_tokenizers_match_transformers(name, tmp_path):
    """End-of-text and padding come from tokenizer_config.json (eos_token, pad_token), as transformers
    reads them, for four real families' tokenizers; no family-specific code in the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    src = SHARED_TOKENIZERS / name
    if not (src / "tokenizer.json").is_file():
        pytest.skip(f"{src} is not present (../shared holds the real tokenizers)")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, tmp_path / f)
    ours = load_tokenizer(tmp_path)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                  **{k: v for k, v in json.loads((src / "tokenizer_config.json").read_text()).items()
                                     if k in ("eos_token", "pad_token", "bos_token")})
    assert ours.eos_id == ref.eos_token_id
    assert ours.pad_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    text = "Hello there, how are you?"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)


def test_eos_from_config_json_when_the_tokenizer_names_none(tmp_path, tiny_ckpt):
    """Without tokenizer_config.json's eos_token, config.json's eos_token_id decides."""
    shutil.copyfile(tiny_ckpt / "vocab.json", tmp_path / "vocab.json")
    shutil.copyfile(tiny_ckpt / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "unknown-family", "eos_token_id": 13}))
    assert load_tokenizer(tmp_path).eos_id == 13
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "unknown-family"}))
    assert load_tokenizer(tmp_path).eos_id == EOS_ID  # a known family's end-of-text token in the vocabulary
