"""loratune/generate/scoring.py: ROUGE-L equals rouge-score's own scorer (and the LCS worked by hand), exact
match after stripping, lengths, means and differences; held-out prompts as training and ``generate`` build
them (the completion task's ``[bos] + prompt``, the chat task's rendered conversation, equal to transformers'
``apply_chat_template``), cut as training cuts; each bad record refused in one line."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("rouge_score")

from loratune.data import DataConfig  # noqa: E402
from loratune.errors import ConfigError, DataError  # noqa: E402
from loratune.generate import SamplingConfig, generate, scoring  # noqa: E402
from loratune.generate.scoring import (Completion, Scores, complete, difference, held_out_prompts,  # noqa: E402
                                       rouge_l, score, summarize)

QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"

PAIRS = [
    # (generated, reference, ROUGE-L F1 worked out by hand from the longest common subsequence of words)
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),  # an exact match
    # LCS the-cat-on-mat = 4 of 6 and 6 words: P = R = 4/6
    ("the cat lay on a mat", "the cat sat on the mat", 2 / 3),
    # LCS the-cat = 2 (police and arrested come in the other order): P = 2/4, R = 2/7, F = 2PR/(P+R) = 4/11
    ("police arrested the cat", "the cat was arrested by police yesterday", 4 / 11),
    # Porter stems (cats -> cat, running and runs -> run): LCS 2 of 2 and 3 words, P = 1, R = 2/3, F = 0.8
    ("cats running", "the cat runs", 0.8),
    # lowercased, punctuation dropped: the same three words
    ("The CAT, sat!", "the cat sat", 1.0),
    ("", "the cat sat", 0.0),  # an empty generation
    ("   \n", "the cat sat", 0.0),  # whitespace only
]


@pytest.mark.parametrize("generated, reference, expected", PAIRS)
def test_rouge_l_equals_rouge_score_and_the_hand_computed_lcs(generated, reference, expected):
    from rouge_score import rouge_scorer

    theirs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, generated)["rougeL"].fmeasure
    ours = rouge_l(generated, reference)
    assert ours == theirs
    assert ours == pytest.approx(expected, abs=1e-12)


def test_exact_match_ignores_surrounding_whitespace_only():
    assert score(Completion(" Paris.\n", 3, True), "Paris.") == Scores(1.0, True, 3, 1, True)
    near = score(Completion("paris", 1, False), "Paris.")
    assert near.rouge_l == 1.0 and not near.exact  # ROUGE lowercases and drops punctuation; exact match does not
    assert score(Completion("", 0, True), "Paris") == Scores(0.0, False, 0, 0, True)


def test_means_and_the_adapter_minus_base_difference():
    base = [Scores(0.5, False, 10, 8, True), Scores(0.25, True, 4, 3, True), Scores(0.0, False, 64, 50, False)]
    adapter = [Scores(0.75, True, 6, 5, True), Scores(0.25, True, 4, 3, True), Scores(0.125, False, 20, 15, True)]
    assert summarize(base) == {"rouge_l": 0.25, "exact": 1 / 3, "tokens": 26.0, "words": 61 / 3, "finished": 2}
    d = difference(base, adapter)
    assert d == pytest.approx({"rouge_l": 0.125, "exact": 1 / 3, "tokens": (30 - 78) / 3,
                               "words": (23 - 61) / 3, "better": 2, "worse": 0, "same": 1})
    assert (d["better"], d["worse"], d["same"]) == (2, 0, 1)
    with pytest.raises(ValueError, match="not the same prompts"):
        difference(base, adapter[:2])


def test_a_missing_rouge_score_is_one_line_naming_the_extra(monkeypatch):
    scoring._rouge.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # what an environment without the package raises
    try:
        with pytest.raises(ConfigError, match=(r"^ROUGE-L needs the rouge-score package, which is not installed: "
                                               r"pip install 'loratune\[eval\]'$")):
            scoring.require_rouge()
    finally:
        scoring._rouge.cache_clear()


# --- held-out prompts: completion ---------------------------------------------------------------------------------

COMPLETION = DataConfig(source="x.jsonl", task="completion", prompt_template="{post}\nTL;DR: ",
                        completion_template="{tldr}")
RECORDS = [{"post": "I locked my keys in the car while it was running.", "tldr": "keys locked in a running car"},
           {"post": "My cat ate the birthday cake.", "tldr": "no cake"}]


def test_completion_prompts_are_bos_and_the_filled_template(tokenizer):
    cases = held_out_prompts(RECORDS, COMPLETION, tokenizer, room=100, source="x.jsonl")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for case, record in zip(cases, RECORDS):
        prompt = record["post"] + "\nTL;DR: "
        assert case.prompt == prompt and case.ids == bos + tokenizer.encode(prompt) and case.cut == 0
        assert case.reference == record["tldr"] and case.reference_tokens == len(tokenizer.encode(record["tldr"]))
        assert case.stops == list(tokenizer.eos_ids)
    assert cases[1].where == "x.jsonl, record 2"


def test_a_long_completion_prompt_keeps_its_end(tokenizer):
    full = held_out_prompts(RECORDS[:1], COMPLETION, tokenizer, room=100, source="x")[0]
    cut = held_out_prompts(RECORDS[:1], COMPLETION, tokenizer, room=6, source="x")[0]
    assert len(cut.ids) == 6 and cut.ids == full.ids[-6:]  # GPT-2 has no BOS: the last 6 tokens
    assert cut.cut == len(full.ids) - 6 and tokenizer.decode(cut.ids).endswith("\nTL;DR: ")


@pytest.mark.parametrize("records, message", [  # records with an empty field are skipped, as training skips them
    ([{"post": "a post"}], r"^field 'tldr' is not in the records of x; they have: post$"),
    ([{"post": "a post", "tldr": "  \n"}], r"^no record of x has a prompt and a reference: every one has an empty"),
    ([{"post": " ", "tldr": "t"}], r"^no record of x has a prompt and a reference"),
    ([RECORDS[0], {"post": "p", "tldr": 3}], r"^x, record 2: field 'tldr' must be text, got int 3"),
    ([], r"^the data is empty: no records from x$"),
])
def test_bad_completion_records_are_refused_in_one_line(tokenizer, records, message):
    with pytest.raises(DataError, match=message):
        held_out_prompts(records, COMPLETION, tokenizer, room=100, source="x")


def test_a_record_with_an_empty_reference_is_skipped_with_a_notice_as_training_skips_it(tokenizer, caplog):
    with caplog.at_level("WARNING"):
        cases = held_out_prompts([RECORDS[0], {"post": "p", "tldr": " "}], COMPLETION, tokenizer, room=100, source="x")
    assert [c.reference for c in cases] == [RECORDS[0]["tldr"]]
    assert "skipped 1 of 2 records of x with an empty or missing 'post' or 'tldr'" in caplog.text


def test_completions_cut_at_the_first_stop_alone_or_in_a_left_padded_batch(model, tokenizer):
    cases = held_out_prompts(RECORDS, COMPLETION, tokenizer, room=100, source="x")
    assert len(cases[0].ids) != len(cases[1].ids)  # the batch below is padded
    raw = generate(model, torch.tensor([cases[0].ids]), SamplingConfig(max_new_tokens=8), eos_ids=None)[0].tolist()
    k = next(i for i in range(1, 8) if raw[i] not in raw[:i])  # a token the model writes first at step k
    stopping = dataclasses.replace(cases[0], stops=[raw[k]])
    assert complete(model, [stopping], tokenizer, 8) == [Completion(tokenizer.decode(raw[:k]), k, True)]
    running = dataclasses.replace(cases[0], stops=[t for t in range(10) if t not in raw])
    assert complete(model, [running], tokenizer, 8) == [Completion(tokenizer.decode(raw), 8, False)]
    singles = [complete(model, [c], tokenizer, 8)[0] for c in cases]
    assert complete(model, cases, tokenizer, 8) == singles


def test_causal_lm_has_no_reference(tokenizer):
    with pytest.raises(ConfigError, match="task completion or chat, not 'causal_lm'"):
        held_out_prompts(RECORDS, DataConfig(source="x", task="causal_lm"), tokenizer, room=100, source="x")


# --- held-out prompts: chat ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3():
    if not (QWEN3 / "tokenizer.json").is_file():
        pytest.skip(f"{QWEN3} is not present (../shared holds the real tokenizers)")
    from loratune.data import load_tokenizer

    return load_tokenizer(QWEN3)


CHAT = DataConfig(source="c.jsonl", task="chat", template_kwargs={"enable_thinking": False})
CONVERSATION = [{"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Translate: cat"}, {"role": "assistant", "content": "chat"},
                {"role": "user", "content": "Translate: the house by the river"},
                {"role": "assistant", "content": "la maison au bord de la rivière"}]


def test_chat_prompts_are_the_conversation_before_the_last_answer_as_transformers_renders_it(qwen3):
    from transformers import AutoTokenizer

    case = held_out_prompts([{"messages": CONVERSATION}], CHAT, qwen3, room=500, source="c.jsonl")[0]
    hf = AutoTokenizer.from_pretrained(QWEN3)
    expected = hf.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True, tokenize=True,
                                      enable_thinking=False)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # a BatchEncoding in transformers 5
    assert case.ids == list(expected)
    assert case.reference == "la maison au bord de la rivière" and case.cut == 0
    assert qwen3.backend.token_to_id("<|im_end|>") in case.stops and case.prompt == qwen3.decode(case.ids)


def test_a_long_chat_prompt_cuts_the_end_of_its_last_user_message(qwen3):
    long = [*CONVERSATION[:3], {"role": "user", "content": "Translate: " + "the red house by the river " * 30},
            CONVERSATION[4]]
    full = held_out_prompts([{"messages": long}], CHAT, qwen3, room=1000, source="c")[0]
    cut = held_out_prompts([{"messages": long}], CHAT, qwen3, room=60, source="c")[0]
    assert len(full.ids) > 60 >= len(cut.ids) > 50 and cut.cut > 0
    assert cut.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the generation prompt stays
    assert "Translate: the red house" in cut.prompt  # the message keeps its start
    with pytest.raises(ConfigError, match="^no room for the prompt of c, record 1: even without its last user"):
        held_out_prompts([{"messages": long}], CHAT, qwen3, room=20, source="c")


@pytest.mark.parametrize("messages, message", [
    (CONVERSATION[:2], r"^c, record 1: no assistant message, so no reference to score against"),
    ([*CONVERSATION[:4], {"role": "assistant", "content": " "}], r"^c, record 1: the reference \(assistant message 4\) "
                                                                 r"is empty"),
    ([CONVERSATION[0], CONVERSATION[2]], r"^c, record 1: no user message before the last assistant turn"),
])
def test_bad_chat_records_are_refused_in_one_line(qwen3, messages, message):
    with pytest.raises(DataError, match=message):
        held_out_prompts([{"messages": messages}], CHAT, qwen3, room=500, source="c")
