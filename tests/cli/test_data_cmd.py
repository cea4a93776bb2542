"""``loratune data`` shows exactly what trains (the arrays the batches use), a minimal chat recipe works,
and ``generate --chat`` renders the prompt as transformers does and stops at the end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_models import qwen3_model_dir

from loratune.cli import main
from loratune.data import Batches, DataConfig, build_examples, load_tokenizer

CHATS = [
    [{"role": "user", "content": "What is 7 plus 5?"}, {"role": "assistant", "content": "12"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "De rien"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
]


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> Path:
    return qwen3_model_dir(tmp_path_factory)


@pytest.fixture
def minimal_recipe(tmp_path, qwen3_model) -> Path:
    """Only model, data.source, data.task and seq_len: everything else defaulted."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS), encoding="utf-8")
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(f"model: {qwen3_model}\ndata:\n  source: {data}\n  task: chat\nseq_len: 64\n", encoding="utf-8")
    return recipe


def test_json_lines_are_the_arrays_the_batches_use(minimal_recipe, qwen3_model, capsys):
    assert main(["data", str(minimal_recipe), "--json", "--limit", "2"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 2 and all(set(r) == {"input_ids", "labels"} for r in rows)
    tok = load_tokenizer(qwen3_model)
    expected = build_examples([{"messages": c} for c in CHATS[:2]], DataConfig(source="x.jsonl", task="chat"), tok, 64)
    assert rows == [{"input_ids": e.input_ids, "labels": e.labels} for e in expected]
    for row in rows:  # aligned as in transformers: a label is its own token or -100
        assert all(lab in (tok_id, -100) for tok_id, lab in zip(row["input_ids"], row["labels"]))
    trained = [t for t, lab in zip(rows[1]["input_ids"], rows[1]["labels"]) if lab != -100]
    assert tok.decode(trained) == "Bonjour<|im_end|>De rien<|im_end|>"
    batch = Batches(expected, 2, shuffle=False, pad_id=tok.pad_id).batch(0, 0)
    assert batch["labels"][0, :len(rows[0]["labels"]) - 1].tolist() == rows[0]["labels"][1:]  # the shift
    assert "3 examples from" in captured.err and "dropped: none" in captured.err


def test_text_view_marks_the_trained_tokens(minimal_recipe, capsys):
    assert main(["data", str(minimal_recipe), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "[[12<|im_end|>]]" in out and "[[Bonjour<|im_end|>]]" in out and "[[De rien<|im_end|>]]" in out
    assert "<|im_start|>user\nWhat is 7 plus 5?<|im_end|>" in out  # the prompt shown unmarked
    assert "--- example 2: " in out and " trained" in out and "dropped: none" in out
    assert main(["data", str(minimal_recipe), "--limit", "1", "--color", "always"]) == 0
    assert "\033[1;32m12<|im_end|>\033[0m" in capsys.readouterr().out


def test_cuts_and_drops_are_shown(minimal_recipe, capsys):
    assert main(["data", str(minimal_recipe), "--set", "seq_len=20", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- example 1: 21 tokens, 3 trained; cut user message 0 to its first " in out  # "1" "2" <|im_end|> whole
    assert "[[12<|im_end|>]]" in out and "cut the last 2 of 5 messages to fit 21 tokens" not in out
    assert main(["data", str(minimal_recipe), "--set", "seq_len=12", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert ("--- example 1: dropped (no assistant token left after the cut to seq_len); cut the first exchange at 13"
            in out)
    assert "dropped: 3 no assistant token left after the cut to seq_len" in out


def test_generate_chat_prompt_equals_apply_chat_template(qwen3_model):
    from transformers import AutoTokenizer

    from loratune.generate.chat import chat_prompt

    tok = load_tokenizer(qwen3_model)
    auto = AutoTokenizer.from_pretrained(qwen3_model)
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
        for variables in ({}, {"enable_thinking": False}):
            ids, stops = chat_prompt(tok, "Hi", system, **variables)
            expected = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **variables)
            expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
            assert ids == list(expected)
            assert stops[0] == auto.convert_tokens_to_ids("<|im_end|>") and tok.eos_id in stops


def test_generate_chat_options_need_chat(qwen3_model, capsys):
    assert main(["generate", "--model", str(qwen3_model), "--prompt", "hi", "--system", "x"]) == 2
    assert "apply to --chat" in capsys.readouterr().err
    assert main(["generate", "--model", str(qwen3_model), "--prompt", "hi", "--chat", "--template-var", "x"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["generate", "--model", str(qwen3_model), "--prompt", "hi", "--chat", "--max-new-tokens", "3"]) == 0


# --- preference, KTO and GRPO data (the recipe's objective decides) ------------------------------------

PREFERENCE_PAIRS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
                     "rejected": [{"role": "assistant", "content": "22"}]},
                    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five."}]


@pytest.fixture
def objectives():
    """dpo, kto and grpo as the cli sees them: the registered ones, or, while train/ does not register them
    yet, stand-ins that only name the data they train on (removed afterwards)."""
    from loratune.train.objective import OBJECTIVES, Objective

    added = []
    for name, kind in (("dpo", "pairs"), ("kto", "unpaired"), ("grpo", "prompts")):
        if name not in OBJECTIVES:
            OBJECTIVES[name] = type(f"StandIn{name.upper()}", (Objective,), {"name": name, "data": kind})
            added.append(name)
        assert OBJECTIVES[name].data == kind
    yield
    for name in added:
        del OBJECTIVES[name]


@pytest.fixture
def tutorial_recipe(tmp_path, qwen3_model) -> Path:
    """The tutorial's data section (a completion task with reddit templates), which a pairs file replaces."""
    recipe = tmp_path / "tutorial.yaml"
    recipe.write_text(f"model: {qwen3_model}\ndata:\n  source: ctr4si/reddit_tifu\n  task: completion\n"
                      "  prompt_template: \"{documents}\\nTL;DR: \"\n  completion_template: \"{tldr}\"\nseq_len: 64\n",
                      encoding="utf-8")
    return recipe


def test_dpo_json_is_trls_token_ids(tutorial_recipe, qwen3_model, tmp_path, objectives, capsys):
    from loratune.data import encode_items

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE_PAIRS), encoding="utf-8")
    assert main(["data", str(tutorial_recipe), "--data", str(pairs), "--set", "objective=dpo", "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    tok = load_tokenizer(qwen3_model)
    items = encode_items(PREFERENCE_PAIRS, "pairs", DataConfig(source=str(pairs)), tok, 64, "x")
    assert rows == [{"prompt_ids": i.prompt_ids, "chosen_ids": i.chosen_ids, "rejected_ids": i.rejected_ids}
                    for i in items]
    assert tok.decode(rows[0]["chosen_ids"]) == " blue.<|im_end|>"  # the EOS appended, as TRL does
    assert "3 pairs from " in captured.err and "objective dpo" in captured.err and "dropped: none" in captured.err


def test_dpo_text_marks_chosen_and_rejected(tutorial_recipe, tmp_path, objectives, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE_PAIRS), encoding="utf-8")
    assert main(["data", str(tutorial_recipe), "--data", str(pairs), "--set", "objective=dpo", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "--- pair 1 (line 1): prompt 3 tokens; chosen 6 tokens, 3 trained; rejected 6 tokens, 3 trained" in out
    assert "chosen:\nThe sky is[[ blue.<|im_end|>]]\nrejected:\nThe sky is[[ green.<|im_end|>]]" in out
    assert "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[" in out and "22<|im_end|>" in out
    assert "--- pair 3" not in out
    assert main(["data", str(tutorial_recipe), "--data", str(pairs), "--set", "objective=dpo", "--set", "seq_len=3",
                 "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- pair 3 (line 3): dropped (the prompt alone has 4 tokens, and seq_len + 1 is 4" in out
    assert "--- pair 1 (line 1): prompt 3 tokens; chosen 4 tokens, 1 trained; rejected 4 tokens, 1 trained; cut to " \
           "4 of 6 tokens (keep_start)" in out
    assert "dropped: 2 with a prompt of seq_len + 1 tokens or more" in out


def test_kto_and_grpo_views(tutorial_recipe, tmp_path, objectives, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE_PAIRS[:1]), encoding="utf-8")
    assert main(["data", str(tutorial_recipe), "--data", str(pairs), "--set", "objective=kto"]) == 0
    out = capsys.readouterr().out  # a pairs file, unpaired as TRL does
    assert "--- example 1 (line 1 (chosen)): desirable (label true); 6 tokens, 3 trained\nThe sky is[[ blue." in out
    assert "--- example 2 (line 1 (rejected)): undesirable (label false);" in out and "2 KTO examples from" in out
    assert main(["data", str(tutorial_recipe), "--data", str(pairs), "--set", "objective=kto", "--json"]) == 0
    assert [json.loads(x)["label"] for x in capsys.readouterr().out.splitlines()] == [True, False]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": [{"role": "user", "content": "2+2?"}], "answer": "4"}) + "\n",
                       encoding="utf-8")
    assert main(["data", str(tutorial_recipe), "--data", str(prompts), "--set", "objective=grpo",
                 "--set", "grpo.prompt_field=question"]) == 0
    out = capsys.readouterr().out
    assert "--- prompt 1 (line 1): " in out and "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" in out
    assert main(["data", str(tutorial_recipe), "--data", str(prompts), "--set", "objective=grpo"]) == 2
    assert "no prompt field 'prompt'; the record has 'question', 'answer'" in capsys.readouterr().err
