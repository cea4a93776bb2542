"""Chat templates render as transformers' apply_chat_template renders them (text and token ids) on
the real Llama 3, Qwen3 and Gemma 3 templates, in a sandbox that refuses Python internals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loratune.data.chat_template import ChatTemplate, read_chat_template, special_tokens
from loratune.data.tokenizer import load_tokenizer
from loratune.errors import DataError

TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"

CONVERSATIONS = [
    [{"role": "user", "content": "What is LoRA?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Summarise: I burnt the toast."},
     {"role": "assistant", "content": "Toast burnt."}],
    [{"role": "user", "content": "Ünïcode ✓ — 日本語?"}, {"role": "assistant", "content": "はい, ünïcode."},
     {"role": "user", "content": ""}, {"role": "assistant", "content": "Empty question, empty answer."}],
    [{"role": "system", "content": "Line one.\nLine two."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.mark.parametrize("name", ["llama3_1", "qwen3", "gemma3"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_text_and_ids_equal_apply_chat_template(tmp_path, name, generation_prompt):
    src = TOKENIZERS / name
    if not src.is_dir():
        pytest.skip(f"{src} is not present (../shared holds the real tokenizers)")
    from transformers import AutoTokenizer

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, tmp_path / f)
    auto, ours = AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    template, special = read_chat_template(tmp_path), special_tokens(tmp_path)
    assert template
    for messages in CONVERSATIONS:
        expected = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        text, _ = ChatTemplate(template, special).render(messages, add_generation_prompt=generation_prompt)
        assert text == expected
        ids = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert ours.encode(text) == list(ids)


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__ }}", "sandbox refuses"),
    ("{% set ns = namespace(_x=1) %}", "sandbox refuses"),
    ("{{ raise_exception('only user and assistant roles are supported') }}", "only user and assistant roles"),
    ("{% for m in messages %}", "does not parse"),
])
def test_bad_or_hostile_templates_are_refused(template, message):
    with pytest.raises(DataError, match=message):
        ChatTemplate(template).render([{"role": "user", "content": "hi"}])


def test_generation_spans_are_recorded():
    template = ("{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    text, spans = ChatTemplate(template).render(CONVERSATIONS[1])
    assert text == "<system>You are terse.<user>Summarise: I burnt the toast.<assistant>Toast burnt.</s>"
    assert [text[a:b] for a, b in spans] == ["Toast burnt.</s>"] and spans[0][1] == len(text)
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    text, spans = ChatTemplate(template).render(two)
    assert text == "<user>a<assistant>b</s><user>c<assistant>d</s>"
    assert spans == [(text.index("b</s>"), text.index("b</s>") + 5), (len(text) - 5, len(text))]
