"""Data pipeline: file formats, label shifting and masking, packing, splits, resumable batches."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratune.data import (
    IGNORE_INDEX,
    Batches,
    DataConfig,
    Example,
    build_examples,
    load_records,
    prepare_data,
    split_train_val,
)
from loratune.data.tokenizer import load_tokenizer
from loratune.errors import ConfigError, DataError

REDDIT = Path(__file__).resolve().parents[3] / "shared/data/reddit_tifu_long/train.jsonl"

RECORDS = [
    {"id": "a", "documents": "i tried to cook pasta and set the kitchen on fire.", "tldr": "burned pasta"},
    {"id": "b", "documents": "my cat walked over the keyboard, \"sending\" my draft, commas and all.",
     "tldr": "the cat sent it"},
    {"id": "c", "documents": "ünïcödé and emoji 🎉 survive every format", "tldr": "bytes are fine"},
]


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer):
    return gpt2_tokenizer


@pytest.fixture(scope="module")
def reddit() -> list[dict]:
    if not REDDIT.is_file():
        pytest.skip(f"real reddit_tifu data not found at {REDDIT}")
    return load_records(str(REDDIT), DataConfig(source=str(REDDIT)))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cfg(**kw) -> DataConfig:
    return DataConfig(source="unused.jsonl", **kw)


# --- loading ---------------------------------------------------------------------------------

def test_every_local_format_loads_the_same_records(tmp_path):
    files = [write_jsonl(tmp_path / "d.jsonl", RECORDS)]
    (tmp_path / "list.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    (tmp_path / "obj.json").write_text(json.dumps({"data": RECORDS}), encoding="utf-8")
    files += [tmp_path / "list.json", tmp_path / "obj.json"]
    with (tmp_path / "d.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "documents", "tldr"])
        writer.writeheader()
        writer.writerows(RECORDS)
    files.append(tmp_path / "d.csv")
    for path in files:
        assert load_records(str(path), cfg()) == RECORDS, path.name
    (tmp_path / "d.txt").write_text("\n".join(r["documents"] for r in RECORDS) + "\n\n  \n", encoding="utf-8")
    assert load_records(str(tmp_path / "d.txt"), cfg()) == [{"text": r["documents"]} for r in RECORDS]


def test_parquet_loads_the_same_records(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed: parquet loading not tested")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    assert load_records(str(tmp_path / "d.parquet"), cfg()) == RECORDS


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what an absent pyarrow looks like to import
    with pytest.raises(DataError, match="needs pyarrow"):
        load_records(str(tmp_path / "d.parquet"), cfg())


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="not found.*nope/train.jsonl"):
        load_records(str(path), cfg())


def test_empty_file_is_a_data_error(tmp_path):
    for name in ("e.jsonl", "e.json", "e.csv", "e.txt"):
        (tmp_path / name).write_text("\n" if name != "e.json" else "[]", encoding="utf-8")
        with pytest.raises(DataError, match=f"empty.*{name}"):
            load_records(str(tmp_path / name), cfg())


def test_bad_json_line_reports_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"documents": "oops",\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 3"):
        load_records(str(path), cfg())
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load_records(str(path), cfg())


def test_unknown_extension_and_directory(tmp_path):
    (tmp_path / "d.xml").write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataError, match="unknown extension"):
        load_records(str(tmp_path / "d.xml"), cfg())
    with pytest.raises(DataError, match="not a file"):
        load_records(str(tmp_path), cfg())


def test_hub_id_offline_is_a_data_error(monkeypatch):
    # datasets reads HF_*_OFFLINE when it is imported, so a fresh interpreter is the only way to be
    # sure offline mode holds (online, an unreachable hub means ~25 s of retries).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = textwrap.dedent("""
        from loratune.data import DataConfig, load_records
        from loratune.errors import DataError
        try:
            load_records("nonexistent-user/nonexistent-ds", DataConfig())
        except DataError as exc:
            print("DataError:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ)
    assert "DataError:" in out.stdout, out.stderr
    assert "'nonexistent-user/nonexistent-ds'" in out.stdout and "local" in out.stdout


# --- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"task": "seq2seq"}, "unknown data task"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"max_examples": 0}, "max_examples"),
    ({"prompt_template": "{documents"}, "does not parse"),
    ({"completion_template": "{}"}, "named fields"),
    ({"train_on": "user"}, "train_on"),
    ({"chat_format": "csv"}, "chat_format"),
    ({"fields": {"speaker": "role"}}, "unknown field 'speaker'"),
])
def test_bad_config_is_a_config_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**kw)


# --- causal_lm -------------------------------------------------------------------------------

def test_causal_lm_shift_truncation_and_eos(tok):
    short, long = "hello world", " ".join(["word"] * 100)
    ex = build_examples([{"documents": short}, {"documents": long}], cfg(), tok, seq_len=16)
    ids = tok.encode(short) + [tok.eos_id]
    assert ex[0].input_ids == ids and ex[0].labels == [IGNORE_INDEX] + ids[1:]  # aligned; the batch shifts
    assert ex[0].labels[-1] == tok.eos_id
    full = tok.encode(long)
    assert ex[1].input_ids == full[:17] and ex[1].labels == [IGNORE_INDEX] + full[1:17]  # truncated: no eos
    assert all(len(e.input_ids) == len(e.labels) <= 17 for e in ex)
    batch = Batches(ex, batch_size=2, shuffle=False, pad_id=0).batch(0, 0)
    assert batch["input_ids"][1].tolist() == full[:16] and batch["labels"][1].tolist() == full[1:17]


def test_empty_records_are_skipped_and_logged(tok, caplog):
    records = [{"documents": "one"}, {"documents": ""}, {"documents": None}, {"documents": "  "}, {"other": 1}]
    ex = build_examples(records, cfg(), tok, seq_len=8)
    assert len(ex) == 1
    assert "skipped 4 of 5" in caplog.text
    with pytest.raises(DataError, match="empty.*no example"):
        build_examples(records[1:], cfg(), tok, seq_len=8)


def test_wrong_field_lists_the_existing_fields(tok):
    with pytest.raises(DataError, match="'text'.*documents, id, tldr"):
        build_examples(RECORDS, cfg(text_field="text"), tok, seq_len=8)
    with pytest.raises(DataError, match="'summary'.*documents, id, tldr"):
        build_examples(RECORDS, cfg(task="completion", completion_template="{summary}"), tok, seq_len=8)


def test_packing_makes_full_blocks_of_the_token_stream(tok):
    texts = [f"document number {i} " * (i + 1) for i in range(12)]
    seq_len = 10
    ex = build_examples([{"documents": t} for t in texts], cfg(packing=True), tok, seq_len=seq_len)
    stream = [t for ids in tok.encode_batch(texts) for t in ids + [tok.eos_id]]
    n = len(ex)
    assert n == (len(stream) - 1) // seq_len and n > 3
    assert all(len(e.input_ids) == len(e.labels) == seq_len + 1 for e in ex)
    assert [t for e in ex for t in e.input_ids[:-1]] == stream[:n * seq_len]
    assert [t for e in ex for t in e.labels[1:]] == stream[1:n * seq_len + 1]
    with pytest.raises(DataError, match="packing needs at least"):
        build_examples([{"documents": "hi"}], cfg(packing=True), tok, seq_len=seq_len)


# --- documents start with BOS where the tokenizer has one -------------------------------------

@pytest.fixture(scope="module")
def bos_tok():
    """A tokenizer that puts a BOS first: the real Llama 2 / Mistral one from ../shared (skipped where absent)."""
    path = REDDIT.parents[2] / "tokenizers" / "llama2"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is not present (../shared holds the real tokenizers)")
    return load_tokenizer(path)


def test_gpt2_documents_have_no_bos(tok):
    """GPT-2 has no BOS (transformers' tokenizer(text) adds nothing): documents stay encode(text) + [eos]."""
    assert tok.bos_id is None
    ex = build_examples(RECORDS, cfg(), tok, seq_len=64)
    assert [e.input_ids for e in ex] == [tok.encode(r["documents"]) + [tok.eos_id] for r in RECORDS]


def test_causal_lm_documents_start_with_bos(bos_tok):
    texts = [r["documents"] for r in RECORDS]
    bos, eos = bos_tok.bos_id, bos_tok.eos_id
    docs = [[bos] + ids + [eos] for ids in bos_tok.encode_batch(texts)]
    assert docs == [ids + [eos] for ids in bos_tok.encode_batch(texts, add_special=True)]  # as tokenizer(text)
    ex = build_examples(RECORDS, cfg(), bos_tok, seq_len=64)
    assert [e.input_ids for e in ex] == docs
    assert all(e.input_ids[0] == bos and e.labels[0] == IGNORE_INDEX and e.labels[1] != IGNORE_INDEX for e in ex)
    packed = build_examples(RECORDS, cfg(packing=True), bos_tok, seq_len=8)
    stream = [t for d in docs for t in d]
    n = len(packed)
    assert n == (len(stream) - 1) // 8
    assert [t for e in packed for t in e.input_ids[:-1]] == stream[:n * 8]
    assert [t for e in packed for t in e.labels[1:]] == stream[1:n * 8 + 1]


@pytest.mark.parametrize("seq_len", [64, 12], ids=["fits", "prompt-cut"])
def test_completion_keeps_bos_first_and_masked(bos_tok, seq_len):
    """The BOS stays first when the prompt loses its start; it is a prompt token (no loss on what follows it)."""
    config, cut = cfg(task="completion"), []
    for r, e in zip(RECORDS, build_examples(RECORDS, config, bos_tok, seq_len)):
        p = bos_tok.encode(config.prompt_template.format(**r))
        c = bos_tok.encode(config.completion_template.format(**r)) + [bos_tok.eos_id]
        ids = e.input_ids
        n_prompt = e.labels.count(IGNORE_INDEX)  # bos + the prompt tokens kept
        assert ids[0] == bos_tok.bos_id and len(ids) <= seq_len + 1
        assert ids[1:n_prompt] == p[len(p) - (n_prompt - 1):]  # the prompt's end survives
        assert e.labels[n_prompt:] == ids[n_prompt:] == c[:len(ids) - n_prompt]
        cut.append(n_prompt - 1 < len(p))
        assert seq_len != 64 or ids == [bos_tok.bos_id] + p + c
    assert any(cut) == (seq_len == 12)


# --- completion ------------------------------------------------------------------------------

def _check_completion_masking(tok, records, config, seq_len):
    ex = build_examples(records, config, tok, seq_len)
    assert len(ex) == len(records)
    for r, e in zip(records, ex):
        p = tok.encode(config.prompt_template.format(**r))
        c = tok.encode(config.completion_template.format(**r)) + [tok.eos_id]
        ids = e.input_ids  # the whole token window
        masked = [t for t, lab in enumerate(e.labels) if lab == IGNORE_INDEX]
        n_prompt = len(masked)
        assert masked == list(range(n_prompt))  # exactly the prompt's tokens
        assert ids[:n_prompt] == p[len(p) - n_prompt:]  # the prompt's end survives
        kept = e.labels[n_prompt:]
        assert kept == ids[n_prompt:] == c[:len(kept)]
        if len(p) + len(c) <= seq_len + 1:
            assert (n_prompt, len(kept)) == (len(p), len(c))
        else:
            assert len(ids) == seq_len + 1 and len(kept) >= min(len(c), (seq_len + 1) // 2)
        if len(kept) == len(c):
            assert tok.decode(kept) == config.completion_template.format(**r) + "<|endoftext|>"
    return ex


def test_completion_masks_prompt_targets_synthetic(tok):
    config = cfg(task="completion")
    _check_completion_masking(tok, RECORDS, config, seq_len=64)  # fits: nothing truncated
    ex = _check_completion_masking(tok, RECORDS, config, seq_len=12)  # prompt cut from the left
    n_prompt = ex[0].labels.count(IGNORE_INDEX)
    assert tok.decode(ex[0].input_ids[:n_prompt]).endswith("fire.\nTL;DR: ")


def test_left_truncation_keeps_the_tldr_marker(tok):
    long_doc = "this is a very long story about nothing. " * 200
    record = {"documents": long_doc, "tldr": "i wrote too much"}
    (ex,) = build_examples([record], cfg(task="completion"), tok, seq_len=64)
    text = tok.decode(ex.input_ids)
    assert len(ex.input_ids) == 65
    assert text.endswith("nothing. \nTL;DR: i wrote too much<|endoftext|>")
    first_target = next(t for t, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    assert tok.decode(ex.input_ids[:first_target]).endswith("\nTL;DR: ")


def test_completion_masking_on_real_reddit_data(tok, reddit):
    records = [r for r in reddit[:200] if r["tldr"].strip()]  # a few real posts have an empty TL;DR
    config = DataConfig(source=str(REDDIT), task="completion")
    ex = _check_completion_masking(tok, records, config, seq_len=256)
    assert any(len(e.input_ids) == 257 for e in ex)  # many posts are longer than the window
    assert all(e.labels[-1] == tok.eos_id for e in ex)  # every TL;DR fit whole, so each was decoded above
    assert all(tok.decode(e.input_ids).count("TL;DR: ") >= 1 for e in ex)


# --- splits and batches ----------------------------------------------------------------------

def _examples(n: int) -> list[Example]:
    return [Example(input_ids=[i] * (2 + i % 5), labels=[IGNORE_INDEX] + [i] * (1 + i % 5)) for i in range(n)]


def test_split_sizes_and_disjointness():
    ex = _examples(100)
    train, val = split_train_val(ex, cfg(val_fraction=0.05), seed=0)
    assert (len(train), len(val)) == (95, 5)
    assert {e.input_ids[0] for e in train} | {e.input_ids[0] for e in val} == set(range(100))
    assert split_train_val(ex, cfg(val_fraction=0.05), seed=0)[1] == val
    assert split_train_val(ex, cfg(val_fraction=0.05), seed=1)[1] != val
    assert [len(s) for s in split_train_val(_examples(10), cfg(val_fraction=0.01), seed=0)] == [9, 1]
    assert [len(s) for s in split_train_val(ex, cfg(val_fraction=0.0), seed=0)] == [100, 0]
    with pytest.raises(DataError, match="cannot hold out"):
        split_train_val(_examples(1), cfg(val_fraction=0.5), seed=0)


def test_batches_are_deterministic_and_resumable():
    ex = _examples(40)
    a, b = Batches(ex, batch_size=4, seed=3, pad_id=0), Batches(ex, batch_size=4, seed=3, pad_id=0)
    assert len(a) == 10
    epoch0 = [a.batch(0, i)["input_ids"][:, 0].tolist() for i in range(len(a))]
    assert sorted(x for batch in epoch0 for x in batch) == list(range(40))  # a permutation
    assert a.order(0) != a.order(1) and a.order(0) != Batches(ex, 4, seed=4, pad_id=0).order(0)
    # batch(e, i) does not depend on what was asked before
    a.batch(5, 2), a.batch(1, 7)
    for e, i in [(1, 3), (0, 9), (1, 3), (7, 0)]:
        for key in ("input_ids", "labels"):
            torch.testing.assert_close(a.batch(e, i)[key], b.batch(e, i)[key], rtol=0, atol=0)
    assert [x["input_ids"][:, 0].tolist() for x in a] == epoch0
    plain = Batches(ex, batch_size=4, shuffle=False, pad_id=0)
    assert plain.batch(3, 1)["input_ids"][:, 0].tolist() == [4, 5, 6, 7]
    with pytest.raises(IndexError):
        a.batch(0, 10)


def test_batches_pad_right_and_handle_the_remainder():
    ex = [Example([1, 2, 3, 4], [IGNORE_INDEX, 2, 3, 4]), Example([5, 6], [IGNORE_INDEX, 6]),
          Example([7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 9])]
    batches = Batches(ex, batch_size=2, shuffle=False, pad_id=0, drop_last=False)
    assert len(batches) == 2
    first = batches.batch(0, 0)
    assert first["input_ids"].dtype == torch.long and first["input_ids"].shape == (2, 3)
    assert first["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0]] and "position_ids" not in first
    assert first["labels"].tolist() == [[2, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]
    assert batches.batch(0, 1)["labels"].tolist() == [[IGNORE_INDEX, 9]]
    assert len(Batches(ex, batch_size=2, pad_id=0)) == 1
    with pytest.raises(DataError, match="no full batch"):
        Batches(ex, batch_size=4, pad_id=0)


# --- end to end ------------------------------------------------------------------------------

def test_prepare_data_subsets_splits_and_reads_val_source(tmp_path, tok):
    records = [{"documents": f"post {i} " * (i % 7 + 1), "tldr": f"summary {i}"} for i in range(50)]
    src = write_jsonl(tmp_path / "train.jsonl", records)
    config = DataConfig(source=str(src), max_examples=20, val_fraction=0.1)
    train, val = prepare_data(config, tok, seq_len=32, seed=0)
    assert (len(train), len(val)) == (18, 2)
    again = prepare_data(config, tok, seq_len=32, seed=0)
    assert again == (train, val)
    other = prepare_data(config, tok, seq_len=32, seed=1)
    assert {tuple(e.input_ids) for e in other[0]} != {tuple(e.input_ids) for e in train}
    val_src = write_jsonl(tmp_path / "val.jsonl", records[:3])
    train, val = prepare_data(DataConfig(source=str(src), val_source=str(val_src)), tok, seq_len=32, seed=0)
    assert (len(train), len(val)) == (50, 3)


def test_prepare_data_on_real_reddit_data(tok, reddit):
    config = DataConfig(source=str(REDDIT), max_examples=300, packing=True)
    train, val = prepare_data(config, tok, seq_len=128, seed=0)
    assert train and val and len(val) < len(train) / 5  # 15 of 300 documents held out, then packed
    assert all(len(e.input_ids) == 129 for e in train + val)
    assert len(reddit) == 1000


def test_packed_validation_holds_no_training_document(tok, tmp_path):
    """With packing, documents are split between training and validation before they are joined into
    one stream, so no block of either side holds a piece of a document of the other. Each document
    repeats one word that is a single token, so every token names its document."""
    words = [w for w in (" apple", " river", " house", " green", " music", " water", " paper", " night", " stone",
                         " horse", " glass", " bread", " chair", " cloud", " money", " table", " train", " phone",
                         " light", " plant") if len(tok.encode(w)) == 1]
    assert len(words) >= 16
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": w * 40} for w in words])
    config = DataConfig(source=str(src), text_field="text", packing=True, val_fraction=0.2)
    train, val = prepare_data(config, tok, seq_len=16, seed=0)
    docs = {tok.encode(w)[0]: w for w in words}
    seen = [{docs[t] for ex in side for t in ex.input_ids + ex.labels if t in docs} for side in (train, val)]
    assert seen[1] and len(seen[1]) == round(0.2 * len(words))  # whole documents held out
    assert not seen[0] & seen[1], f"documents on both sides: {seen[0] & seen[1]}"
    assert seen[0] | seen[1] == set(words)


def test_real_records_with_an_empty_tldr_are_skipped(tok, reddit, caplog):
    empty = sum(not r["tldr"].strip() for r in reddit)
    ex = build_examples(reddit, DataConfig(source=str(REDDIT), task="completion"), tok, seq_len=64)
    assert empty > 0 and len(ex) == len(reddit) - empty
    assert f"skipped {empty} of {len(reddit)} records" in caplog.text


# --- property --------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.tuples(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=60)),
                   min_size=1, max_size=8),
    seq_len=st.integers(min_value=2, max_value=48),
    task=st.sampled_from(["causal_lm", "completion"]),
)
def test_examples_always_fit(tok, texts, seq_len, task):
    records = [{"documents": d, "tldr": s} for d, s in texts if d.strip() and s.strip()]
    if not records:
        return
    ex = build_examples(records, cfg(task=task), tok, seq_len)
    assert len(ex) == len(records)
    for e in ex:
        assert 2 <= len(e.input_ids) == len(e.labels) <= seq_len + 1 and e.labels[0] == IGNORE_INDEX
        assert all(lab == IGNORE_INDEX or 0 <= lab < tok.vocab_size for lab in e.labels)
        assert all(0 <= t < tok.vocab_size for t in e.input_ids)
        if task == "completion":  # the first completion token always keeps its label
            assert any(lab != IGNORE_INDEX for lab in e.labels)
