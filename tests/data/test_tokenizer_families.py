"""loratune/data/tokenizer.py on today's families' real tokenizers: ids, special tokens and text
equal transformers' AutoTokenizer on 1,000 real posts.

Llama 3.1 (byte-level BPE, PreTrainedTokenizerFast), Llama 2 / Mistral (SentencePiece-style BPE
with byte fallback, LlamaTokenizer: transformers 5 rebuilds its pre-tokenizer), Qwen3 (byte-level
BPE, no BOS) and Gemma 3 (SentencePiece-style BPE, GemmaTokenizer). The files live in
../shared/tokenizers (see its PROVENANCE.md); every test skips where they are absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import DATA_FILE

from loratune.data.tokenizer import load_tokenizer
from loratune.errors import CheckpointError

TOKENIZERS = DATA_FILE.parents[2] / "tokenizers"
# what transformers' tokenizer(text) puts first, the end-of-text token, the padding token (None: transformers
# has none, and we pad with eos)
EXPECTED = {
    "llama3_1": {"bos": 128000, "eos": 128009, "pad": None},  # <|begin_of_text|>, <|eot_id|>
    "llama2": {"bos": 1, "eos": 2, "pad": None},  # <s>, </s>
    "qwen3": {"bos": None, "eos": 151645, "pad": 151643},  # no BOS, <|im_end|>, <|endoftext|>
    "gemma3": {"bos": 2, "eos": 106, "pad": 0},  # <bos>, <end_of_turn>, <pad>
}
TRICKY = [
    " leading space", "  two leading spaces", "trailing  ", "", " ", "\n\nnew lines\n", "tabs\tand\r\nCRLF",
    "x<s> y </s> z", "<s>", "<bos>text<eos>", "<|begin_of_text|>hi<|eot_id|>", "<|im_start|>user\nhi<|im_end|>",
    "<mask> <pad> <unk> <end_of_turn>", "<0x41> byte token text", "unicode: café naïve 日本語 한국어 ½ ∑",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷", "I'm sure it's what they'd've wanted , isn't it ?", "numbers 3.14159 1,000,000",
]


def _tokenizer_dir(name: str) -> Path:
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is not present (../shared holds the real tokenizers)")
    return path


@pytest.fixture(scope="module")
def posts() -> list[str]:
    if not DATA_FILE.is_file():
        pytest.skip(f"real-text sample {DATA_FILE} is not present")
    with DATA_FILE.open(encoding="utf-8") as f:
        texts = [json.loads(line)["documents"] for line in f]
    assert len(texts) == 1000
    return texts


@pytest.fixture(scope="module", params=list(EXPECTED))
def family(request):
    """(name, ours, transformers' AutoTokenizer) for one real tokenizer directory."""
    from transformers import AutoTokenizer

    path = _tokenizer_dir(request.param)
    return request.param, load_tokenizer(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def reference(family, posts) -> dict[bool, list[list[int]]]:
    """transformers' ids of every post, with special tokens and without (those its post-processor did
    not add: one pass instead of two, checked against a second pass on the first 50 posts)."""
    _, _, hf = family
    enc = hf(posts, return_special_tokens_mask=True)
    plain = [[t for t, added in zip(ids, mask) if not added]
             for ids, mask in zip(enc["input_ids"], enc["special_tokens_mask"])]
    assert plain[:50] == hf(posts[:50], add_special_tokens=False)["input_ids"]
    return {False: plain, True: enc["input_ids"]}


def test_special_ids_equal_transformers(family):
    name, ours, hf = family
    want = EXPECTED[name]
    assert (ours.bos_id, ours.eos_id) == (want["bos"], want["eos"]) == (hf.bos_token_id, hf.eos_token_id)
    assert hf.pad_token_id == want["pad"]
    assert ours.pad_id == (want["pad"] if want["pad"] is not None else ours.eos_id)  # no pad: we pad with eos
    assert ours.eos_ids == (ours.eos_id,)  # no generation_config.json here
    first = hf("Hello")["input_ids"][0]
    assert ours.bos_id == (first if first != hf("Hello", add_special_tokens=False)["input_ids"][0] else None)


@pytest.mark.parametrize("special", [False, True], ids=["plain", "special"])
def test_ids_of_real_posts_equal_transformers(family, posts, reference, special):
    _, ours, _ = family
    assert ours.encode_batch(posts, add_special=special) == reference[special]
    assert [ours.encode(t, add_special=special) for t in posts[:20]] == reference[special][:20]


def test_decode_of_real_posts_equals_transformers(family, posts, reference):
    """With and without skipping special tokens, on the ids with special tokens; the round trip
    gives back every post, as transformers' does."""
    _, ours, hf = family
    for skip in (False, True):
        text = [ours.decode(ids, skip_special=skip) for ids in reference[True]]
        assert text == hf.batch_decode(reference[True], skip_special_tokens=skip)
    assert text == posts
    assert [ours.decode(ids) for ids in reference[False]] == posts


def test_tricky_strings_equal_transformers(family):
    """Leading spaces, text next to special tokens, special tokens' text, byte fallback, unicode."""
    _, ours, hf = family
    for special in (False, True):
        ids = [ours.encode(t, add_special=special) for t in TRICKY]
        assert ids == hf(TRICKY, add_special_tokens=special)["input_ids"]
        for skip in (False, True):
            assert [ours.decode(i, skip_special=skip) for i in ids] == hf.batch_decode(ids, skip_special_tokens=skip)


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def test_pipeline_equals_transformers(family):
    """Normalizer, pre-tokenizer, decoder, post-processor, BPE settings and added (special) tokens are
    transformers'."""
    _, ours, hf = family
    mine, theirs = ours.backend, hf.backend_tokenizer
    for part in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert _state(getattr(mine, part)) == _state(getattr(theirs, part)), part
    for name in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                 "byte_fallback", "ignore_merges"):
        assert getattr(mine.model, name) == getattr(theirs.model, name), name
    assert ({i: repr(t) for i, t in mine.get_added_tokens_decoder().items()}
            == {i: repr(t) for i, t in theirs.get_added_tokens_decoder().items()})


def test_llama2_leading_space_as_transformers_5_reads_it():
    """LlamaTokenizer's rebuild matters: the tokenizer.json alone gives other ids for a leading space."""
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    path = _tokenizer_dir("llama2")
    ours, raw = load_tokenizer(path), Backend.from_file(str(path / "tokenizer.json"))
    text = " leading space"
    assert ours.encode(text) == AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) != raw.encode(text, add_special_tokens=False).ids


def test_a_mistral_checkpoint_reads_the_same_file_as_saved(tmp_path, posts):
    """With config.json's model_type mistral, transformers ignores tokenizer_class and reads the
    Llama 2-style tokenizer.json as saved: a leading space keeps its own '▁' token there."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(_tokenizer_dir("llama2") / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 32000}))
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    texts = [" " + p[:300] for p in posts[:200]] + [p[:300] for p in posts[:200]]
    assert [ours.encode(t, add_special=True) for t in texts] == auto(texts)["input_ids"]
    assert ours.encode(" x") == [28705, 1318]  # '▁' then 'x'; the llama model_type gives [1318]


def test_eos_ids_from_generation_config_and_config(tmp_path):
    """Llama 3.1 instruct stops on <|eot_id|> and <|end_of_text|>; config.json's list adds <|eom_id|>."""
    from transformers import GenerationConfig

    src = _tokenizer_dir("llama3_1")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, tmp_path / f)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    ours = load_tokenizer(tmp_path)
    assert ours.eos_id == 128009 and ours.eos_ids == (128009, 128001)
    assert set(ours.eos_ids) == set(GenerationConfig.from_pretrained(tmp_path).eos_token_id)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 128008}))  # an int
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    assert load_tokenizer(tmp_path).eos_ids == (128009, 128008, 128001)


def test_a_vocabulary_larger_than_the_embedding_is_refused(small_gpt2):
    from loratune.models import check_tokenizer_fits

    tokenizer = load_tokenizer(_tokenizer_dir("llama2"))
    with pytest.raises(CheckpointError, match=f"{tokenizer.vocab_size} tokens.*{small_gpt2.config.vocab_size} rows"):
        check_tokenizer_fits(small_gpt2, tokenizer)
