"""Preference, KTO and GRPO data: the formats TRL reads, token ids equal to TRL's own preprocessing on real
tokenizers (its ``_prepare_dataset`` run on the same records), TRL's truncation and drops, the batch contract
(pairs, KTO's KL rows, GRPO's uids), deterministic batches, and every refusal naming its record."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratune.data import (
    IGNORE_INDEX,
    Batches,
    DataConfig,
    PairItem,
    PromptItem,
    UnpairedItem,
    build_items,
    encode_items,
    load_tokenizer,
    prepare_data,
)
from loratune.data.preference_formats import extract_prompt
from loratune.data.preference_items import cut_row
from loratune.errors import ConfigError, DataError

TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"

PAIRS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five, I think."},
    {"prompt": "Ünïcode 🎉 says", "chosen": " hello", "rejected": " bye"},
]
CHAT_PAIRS = [
    {"prompt": [{"role": "user", "content": "What colour is the sky?"}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Green, mostly."}]},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "22"}]},
]
IMPLICIT = [{"chosen": "Q: hi A: hello", "rejected": "Q: hi A: bye"},
            {"chosen": "Q: why? A: because.", "rejected": "Q: why? A: no idea"}]
IMPLICIT_CHAT = [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                  "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}]
CFG = DataConfig(source="pairs.jsonl")


@functools.cache
def _real(name: str):
    """(loratune's tokenizer, transformers' tokenizer) of a real model's tokenizer in ../shared."""
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is not present (../shared holds the real tokenizers)")
    from transformers import AutoTokenizer

    return load_tokenizer(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["llama3_1", "qwen3"])
def real(request):
    return _real(request.param)


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    return gpt2_tokenizer


def _trl(trainer: str, records: list[dict], hf, **args):
    """TRL's own preprocessing of ``records`` (its ``_prepare_dataset``, run as the trainer runs it)."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    if trainer == "dpo":
        from trl.trainer.dpo_trainer import DPOTrainer as cls
        this = SimpleNamespace(_tokenizer=hf)
        args = {"max_length": None, "truncation_mode": "keep_start", **args}
    else:
        from trl.trainer.kto_trainer import KTOTrainer as cls
        this = SimpleNamespace(_tokenizer=hf, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
        args = {"max_length": None, "per_device_train_batch_size": 2, **args}
    return list(cls._prepare_dataset(this, datasets.Dataset.from_list(records), hf,
                                     SimpleNamespace(dataset_num_proc=None, **args), "train"))


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- token ids: TRL's, on real tokenizers ----------------------------------------------------------

@pytest.mark.parametrize("records", [PAIRS, CHAT_PAIRS, IMPLICIT, IMPLICIT_CHAT],
                         ids=["text", "conversational", "implicit-text", "implicit-conversational"])
def test_pairs_tokenize_as_trl(real, records):
    tok, hf = real
    expected = _trl("dpo", records, hf)
    items = encode_items(records, "pairs", CFG, tok, 256, "pairs.jsonl")
    assert [(i.prompt_ids, i.chosen_ids, i.rejected_ids) for i in items] == \
        [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in expected]
    if isinstance(records[0]["chosen"], str):  # the EOS text appended, once
        assert all(i.chosen_ids[-1] == tok.eos_id and i.rejected_ids[-1] == tok.eos_id for i in items)
        ended = [{**records[0], "chosen": records[0]["chosen"] + hf.eos_token}]
        assert encode_items(ended, "pairs", CFG, tok, 256, "x")[0].chosen_ids == items[0].chosen_ids


def test_template_variables_reach_the_template_as_in_trl():
    tok, hf = _real("qwen3")
    records = [{**r, "chat_template_kwargs": {"enable_thinking": False}} for r in CHAT_PAIRS]
    expected = _trl("dpo", records, hf)
    items = encode_items(records, "pairs", CFG, tok, 256, "x")
    assert [(i.prompt_ids, i.chosen_ids) for i in items] == [(e["prompt_ids"], e["chosen_ids"]) for e in expected]
    plain = encode_items(CHAT_PAIRS, "pairs", CFG, tok, 256, "x")
    assert plain[0].chosen_ids != items[0].chosen_ids  # the empty <think> block is Qwen3's default, not here
    assert encode_items(CHAT_PAIRS, "pairs", DataConfig(source="x.jsonl", template_kwargs={"enable_thinking": False}),
                        tok, 256, "x")[0].chosen_ids == items[0].chosen_ids


def test_completion_starts_where_the_tokens_diverge_as_in_trl(caplog):
    tok, hf = _real("qwen3")
    records = [{"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."}]  # " blue" is one token
    expected = _trl("dpo", records, hf)
    with caplog.at_level(logging.WARNING, logger="loratune"):
        item = encode_items(records, "pairs", CFG, tok, 64, "x")[0]
    assert (item.prompt_ids, item.chosen_ids, item.rejected_ids) == \
        (expected[0]["prompt_ids"], expected[0]["chosen_ids"], expected[0]["rejected_ids"])
    assert tok.decode(item.chosen_ids) == " blue.<|im_end|>"
    assert "in 1 of 1 examples the tokenized prompt is not a prefix of the tokenized prompt + completion" in caplog.text


@pytest.mark.parametrize("paired", [False, True], ids=["unpaired", "pairs-unpaired"])
def test_kto_tokenizes_unpairs_and_builds_kl_rows_as_trl(real, paired):
    tok, hf = real
    if paired:
        records = PAIRS + [{"prompt": "Why?", "chosen": " Because.", "rejected": " No."}]
    else:
        records = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                   for p in PAIRS for k in ("chosen", "rejected")][:5]
    expected = _trl("kto", records, hf, per_device_train_batch_size=3)
    items = encode_items(records, "unpaired", CFG, tok, 256, "x")
    assert [(i.prompt_ids, i.completion_ids, i.desirable) for i in items] == \
        [(e["prompt_ids"], e["completion_ids"], e["label"]) for e in expected]
    batches = Batches(items, 3, shuffle=False, pad_id=tok.pad_id, drop_last=False)  # TRL reads KTO data in order
    kl_rows = [row for b in batches for row in _rows(b)[1]]
    trl_kl = [e["prompt_ids"] + e["KL_completion_ids"] for e in expected]
    assert kl_rows == trl_kl


def test_grpo_prompts_tokenize_as_trl(real):
    tok, hf = real
    records = [{"prompt": "The sky is", "answer": "blue"},
               {"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"}]
    items = encode_items(records, "prompts", CFG, tok, 256, "x")
    assert items[0].prompt_ids == hf(text=records[0]["prompt"])["input_ids"]  # TRL's _tokenize_prompts
    chat = hf.apply_chat_template(records[1]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert items[1].prompt_ids == list(chat["input_ids"])
    assert items[1].record == records[1]


# --- truncation: TRL's collators -------------------------------------------------------------------

def _rows(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """Row 0 and row 1 sequences of a (B, 2, T) batch, unshifted and unpadded (prompt + completion ids)."""
    out = ([], [])
    for b in range(batch["input_ids"].shape[0]):
        for r in range(2):
            ids, labels = batch["input_ids"][b, r].tolist(), batch["labels"][b, r].tolist()
            n = max((t + 1 for t, lab in enumerate(labels) if lab != IGNORE_INDEX), default=0)
            out[r].append(ids[:n] + [labels[n - 1]] if n else ids)
    return out


@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_truncation_equals_trl_collators(gpt2, truncation):
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    seq_len = 7
    cfg = DataConfig(source="x.jsonl", truncation=truncation, warn_dropped=1.0)
    items = encode_items(PAIRS, "pairs", cfg, gpt2, seq_len, "x")
    trl = DataCollatorForPreference(pad_token_id=gpt2.pad_id, max_length=seq_len + 1, truncation_mode=truncation)(
        [{"prompt_ids": i.prompt_ids, "chosen_ids": i.chosen_ids, "rejected_ids": i.rejected_ids} for i in items])
    for n, item in enumerate(items):
        for r, row in enumerate(item.rows()):
            k = n + r * len(items)  # TRL stacks the chosen rows, then the rejected
            length = int(trl["attention_mask"][k].sum())
            assert row.input_ids == trl["input_ids"][k, :length].tolist()
            trained = [lab != IGNORE_INDEX for lab in row.labels]
            assert trained[1:] == trl["completion_mask"][k, 1:length].bool().tolist()  # position 0 predicts nothing
    if truncation == "keep_start":  # TRL's KTO collator cuts only this way
        unpaired = [i for i in encode_items(PAIRS, "unpaired", cfg, gpt2, seq_len, "x") if i.fits][:3]
        trl = DataCollatorForUnpairedPreference(pad_token_id=gpt2.pad_id, max_length=seq_len + 1)(
            [{"prompt_ids": i.prompt_ids, "completion_ids": i.completion_ids, "label": i.desirable,
              "KL_completion_ids": unpaired[n - 1].completion_ids} for n, i in enumerate(unpaired)])
        rows, kl = _rows(UnpairedItem.collate(unpaired, gpt2.pad_id))
        assert rows == [trl["input_ids"][k, :int(trl["attention_mask"][k].sum())].tolist() for k in range(3)]
        assert kl == [trl["KL_input_ids"][k, :int(trl["KL_attention_mask"][k].sum())].tolist() for k in range(3)]


def test_cut_row_keeps_start_or_end():
    assert cut_row([1, 2, 3], [4, 5, 6], 4, "keep_start") == cut_row([1, 2, 3], [4], 9, "keep_start")
    end = cut_row([1, 2, 3], [4, 5, 6], 4, "keep_end")
    assert end.input_ids == [3, 4, 5, 6] and end.labels == [IGNORE_INDEX, 4, 5, 6]
    start = cut_row([1, 2], [4, 5, 6], 9, "keep_start")
    assert start.labels == [IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6]


def test_keep_start_drops_pairs_whose_prompt_fills_the_limit(gpt2, caplog):
    long = {"prompt": "word " * 20, "chosen": " yes", "rejected": " no"}
    records = [long, *PAIRS]
    with caplog.at_level(logging.WARNING, logger="loratune"):
        items = build_items(records, "pairs", DataConfig(source="x.jsonl"), gpt2, 10, "x")
    assert len(items) == 3 and all(len(i.prompt_ids) < 11 for i in items)
    assert "1 of 4 pairs (25%) were dropped: the prompt alone has 11 tokens or more" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loratune"):
        kept = build_items(records, "pairs", DataConfig(source="x.jsonl", truncation="keep_end"), gpt2, 10, "x")
    assert len(kept) == 4 and "dropped" not in caplog.text
    assert kept[0].rows()[0].input_ids[-2:] == gpt2.encode(" yes<|endoftext|>")  # its end kept
    with pytest.raises(DataError, match=r"none of the 1 pairs of x fits: the prompt alone has 11 tokens .* keep_end"):
        build_items([long], "pairs", DataConfig(source="x.jsonl"), gpt2, 10, "x")
    with caplog.at_level(logging.WARNING, logger="loratune"):  # under warn_dropped: no warning
        build_items([long, *PAIRS * 10], "pairs", DataConfig(source="x.jsonl", warn_dropped=0.05), gpt2, 10, "x")
    assert "dropped" not in caplog.text


def test_grpo_prompt_too_long_is_dropped_or_keeps_its_end(gpt2):
    records = [{"prompt": "one two three four five six seven eight"}, {"prompt": "short"}]
    assert [len(i.prompt_ids) for i in build_items(records, "prompts", DataConfig(source="x.jsonl", warn_dropped=1),
                                                   gpt2, 4, "x")] == [1]
    kept = build_items(records, "prompts", DataConfig(source="x.jsonl", truncation="keep_end"), gpt2, 4, "x")
    assert kept[0].prompt_ids == gpt2.encode(" five six seven eight") and kept[0].cut == 4


# --- batches -----------------------------------------------------------------------------------------

def test_pair_batches_shapes_padding_and_labels(gpt2):
    items = build_items(PAIRS, "pairs", CFG, gpt2, 64, "x")
    batch = Batches(items, 3, shuffle=False, pad_id=gpt2.pad_id).batch(0, 0)
    assert set(batch) == {"input_ids", "labels"}
    longest = max(len(i.prompt_ids) + max(len(i.chosen_ids), len(i.rejected_ids)) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 2, longest - 1)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for b, item in enumerate(items):
        for r, answer in enumerate((item.chosen_ids, item.rejected_ids)):
            seq = item.prompt_ids + answer
            n = len(seq) - 1
            assert batch["input_ids"][b, r, :n].tolist() == seq[:-1]
            assert (batch["input_ids"][b, r, n:] == gpt2.pad_id).all()
            labels = batch["labels"][b, r].tolist()
            assert labels[:len(item.prompt_ids) - 1] == [IGNORE_INDEX] * (len(item.prompt_ids) - 1)
            assert labels[len(item.prompt_ids) - 1:n] == answer  # the completion, shifted
            assert set(labels[n:]) <= {IGNORE_INDEX}
    for item, ref in zip(items, [(-1.0, -2.0), (-3.0, -4.0), (-5.5, -6.5)]):
        item.ref_logps = ref
    batch = Batches(items, 3, shuffle=False, pad_id=gpt2.pad_id).batch(0, 0)
    assert batch["ref_logps"].dtype == torch.float32
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0], [-3.0, -4.0], [-5.5, -6.5]]


def test_kto_kl_rows_rotate_the_batch_completions():
    items = [UnpairedItem([10, 11], [20, 21, 22], True, 64), UnpairedItem([12], [23], False, 64),
             UnpairedItem([13, 14, 15], [24, 25], True, 64)]
    batch = UnpairedItem.collate(items, pad_id=0)
    assert batch["input_ids"].shape == (3, 2, 4) and batch["desirable"].tolist() == [True, False, True]
    rows, kl = _rows(batch)
    assert rows == [[10, 11, 20, 21, 22], [12, 23], [13, 14, 15, 24, 25]]
    assert kl == [[10, 11, 24, 25], [12, 20, 21, 22], [13, 14, 15, 23]]  # prompt i + completion i - 1
    assert batch["labels"][1, 1].tolist() == [20, 21, 22, IGNORE_INDEX]  # the KL row's completion trains
    assert _rows(UnpairedItem.collate(items[:1], pad_id=0))[1] == [[10, 11, 20, 21, 22]]  # alone: its own


def test_grpo_uids_span_train_then_validation(gpt2, tmp_path):
    records = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(10)]
    src = _write(tmp_path / "prompts.jsonl", records)
    cfg = DataConfig(source=str(src), val_fraction=0.2)
    train, val = prepare_data(cfg, gpt2, 32, seed=0, kind="prompts", prompt_field="question")
    assert len(train) == 8 and len(val) == 2 and all(isinstance(i, PromptItem) for i in train + val)
    assert [i.uid for i in train] == list(range(8)) and [i.uid for i in val] == [8, 9]
    assert sorted(int(i.record["answer"]) for i in train + val) == [2 * i for i in range(10)]
    assert train[0].where == f"{src}, line {int(train[0].record['answer']) // 2 + 1}"
    batch = Batches(train, 4, seed=3, pad_id=gpt2.pad_id).batch(1, 1)
    assert set(batch) == {"input_ids", "prompt_lens", "uid"} and batch["input_ids"].shape[0] == 4
    for row, uid in enumerate(batch["uid"].tolist()):
        ids = train[uid].prompt_ids
        assert batch["prompt_lens"][row] == len(ids) and batch["input_ids"][row, :len(ids)].tolist() == ids
        assert (batch["input_ids"][row, len(ids):] == gpt2.pad_id).all()


def test_batches_are_deterministic_and_resumable(gpt2):
    items = build_items(PAIRS * 4, "pairs", CFG, gpt2, 64, "x")
    a, b = Batches(items, 4, seed=7, pad_id=gpt2.pad_id), Batches(items, 4, seed=7, pad_id=gpt2.pad_id)
    for epoch, index in [(0, 0), (0, 2), (3, 1)]:
        x, y = a.batch(epoch, index), b.batch(epoch, index)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.order(0) != a.order(1) and sorted(a.order(1)) == list(range(12))
    with pytest.raises(DataError, match="mixes PairItem with PromptItem"):
        Batches([items[0], PromptItem([1], {}, 8)], 2, shuffle=False, pad_id=0).batch(0, 0)


# --- formats, files and the tutorial recipe's data section ---------------------------------------------

def test_a_pairs_file_trains_whatever_the_data_task_says(gpt2, tmp_path):
    src = _write(tmp_path / "pairs.jsonl", PAIRS * 4 + IMPLICIT)
    tutorial = DataConfig(source=str(src), hub_config="long", task="causal_lm", text_field="documents",
                          prompt_template="{documents}\nTL;DR: ", completion_template="{tldr}", val_fraction=0.1)
    train, val = prepare_data(tutorial, gpt2, 64, seed=1, kind="pairs")
    assert len(train) + len(val) == 14 and len(val) == 1 and all(isinstance(i, PairItem) for i in train + val)
    kto, kto_val = prepare_data(tutorial, gpt2, 64, seed=1, kind="unpaired")
    assert len(kto) == 2 * len(train) and len(kto_val) == 2  # split by record, then unpaired
    val_src = _write(tmp_path / "val.jsonl", PAIRS[:2])
    _, val = prepare_data(DataConfig(source=str(src), val_source=str(val_src)), gpt2, 64, seed=1, kind="pairs")
    assert [v.where for v in val] == [f"{val_src}, line 1", f"{val_src}, line 2"]


def test_extract_prompt_is_trls():
    from trl.data_utils import extract_prompt as trl_extract

    cases = [("Q: hi A: hello", "Q: hi A: bye"), ("abc", "abd"), ("same", "same"), ("ab", "abc"),
             (IMPLICIT_CHAT[0]["chosen"], IMPLICIT_CHAT[0]["rejected"])]
    for chosen, rejected in cases:
        got = extract_prompt(chosen, rejected)
        want = trl_extract({"chosen": chosen, "rejected": rejected})
        assert got == (want["prompt"], want["chosen"], want["rejected"])
    assert extract_prompt("x ", "y") == ("", "x ", "y")  # TRL would take "x" as the prompt here


def test_text_prompt_beside_conversations_is_implicit(gpt2):
    tok, _ = _real("qwen3")
    record = {"prompt": "Hi", **IMPLICIT_CHAT[0]}  # TRL's maybe_extract_prompt: the prompt comes from the pair
    assert encode_items([record], "pairs", CFG, tok, 64, "x") == encode_items(IMPLICIT_CHAT, "pairs", CFG, tok, 64, "x")


def test_kto_pairs_unpair_chosen_then_rejected(gpt2):
    items = encode_items(PAIRS, "unpaired", CFG, gpt2, 64, "data.jsonl")
    assert [i.desirable for i in items] == [True] * 3 + [False] * 3
    assert items[0].where == "data.jsonl, record 1 (chosen)" and items[3].where == "data.jsonl, record 1 (rejected)"
    assert items[3].completion_ids == gpt2.encode(" green.<|endoftext|>")


def test_truncation_setting_is_checked():
    with pytest.raises(ConfigError, match="unknown data.truncation 'left'; choose one of keep_start, keep_end"):
        DataConfig(truncation="left")


# --- refusals: each names the record and what to do ------------------------------------------------------

@pytest.mark.parametrize("kind, record, message", [
    ("pairs", {"prompt": "p", "good": "x", "bad": "y"},
     (r"data.jsonl, line 1: no 'chosen' or 'rejected' field; the record has 'prompt', 'good', 'bad'. Expected TRL's "
      r"preference format \{\"prompt\", \"chosen\", \"rejected\"\}")),
    ("pairs", {"prompt": "p", "completion": "x", "label": True}, r"use objective kto"),
    ("pairs", {"prompt": "p", "chosen": "x", "rejected": "  "}, r"line 1: rejected is empty; give it a text"),
    ("pairs", {"prompt": "p", "chosen": [], "rejected": "x"}, r"line 1: chosen is an empty list of messages"),
    ("pairs", {"prompt": "p", "chosen": "x", "rejected": [{"role": "assistant", "content": "y"}]},
     r"line 1: chosen is a text but rejected a list of messages"),
    ("pairs", {"prompt": "p", "chosen": [{"role": "assistant", "content": 3}], "rejected": "y"},
     r"line 1: chosen message 0 \(assistant\) content must be text, got int 3"),
    ("pairs", {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     r"line 1: chosen and rejected share no first message, so there is no prompt"),
    ("unpaired", {"prompt": "p", "completion": "x", "label": "yes"},
     r"line 1: label must be true \(a desirable completion\) or false \(an undesirable one\), got the text 'yes'"),
    ("unpaired", {"prompt": "p", "completion": "x", "label": 1}, r"line 1: label must be true .* got int 1"),
    ("unpaired", {"prompt": "p", "text": "x"},
     r"line 1: no 'completion' or 'label' field; the record has 'prompt', 'text'. Expected TRL's unpaired format"),
    ("prompts", {"prompt": "  ", "answer": "4"}, r"line 1: the prompt 'prompt' is empty; give every record a prompt"),
    ("prompts", {"question": "q"},
     r"line 1: no prompt field 'prompt'; the record has 'question'\. .*grpo.prompt_field"),
    ("prompts", {"prompt": 5}, r"line 1: prompt must be a text or a list of messages, got int 5"),
])
def test_bad_records_are_refused_naming_them(gpt2, tmp_path, kind, record, message):
    src = _write(tmp_path / "data.jsonl", [record])
    with pytest.raises(DataError, match=message.replace("data.jsonl", str(src).replace("\\", "\\\\"))):
        prepare_data(DataConfig(source=str(src), val_fraction=0), gpt2, 32, seed=0, kind=kind)


def test_identical_pairs_warn_naming_the_records(gpt2, tmp_path, caplog):
    src = _write(tmp_path / "data.jsonl", [PAIRS[0], {"prompt": "p", "chosen": " a", "rejected": " a"}, PAIRS[1],
                                           {"chosen": "same", "rejected": "same"}])
    with caplog.at_level(logging.WARNING, logger="loratune"):
        train, _ = prepare_data(DataConfig(source=str(src), val_fraction=0), gpt2, 32, seed=0, kind="pairs")
    assert len(train) == 4  # trained, not refused
    assert f"{src}: 2 of 4 pairs have the same chosen and rejected (line 2, line 4): they teach nothing" in caplog.text


def test_empty_data_is_refused(gpt2, tmp_path):
    with pytest.raises(DataError, match="the data is empty: no records from x"):
        build_items([], "pairs", CFG, gpt2, 32, "x")
    src = tmp_path / "empty.jsonl"
    src.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="the data is empty"):
        prepare_data(DataConfig(source=str(src)), gpt2, 32, seed=0, kind="prompts")
    with pytest.raises(DataError, match="unknown data kind 'rl'"):
        prepare_data(DataConfig(source=str(src)), gpt2, 32, seed=0, kind="rl")
