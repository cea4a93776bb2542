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
