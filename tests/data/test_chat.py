"""Chat examples: the trained tokens are exactly the assistant contents plus their end-of-turn tokens on
every real template, last-turn and all-token modes, truncation by whole turns, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.data import DataConfig, build_examples, encode_records
from loratune.data.chat import ChatEncoder
from loratune.data.chat_template import CHATML
from loratune.data.examples import IGNORE_INDEX
from loratune.data.tokenizer import load_tokenizer
from loratune.errors import DataError

TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"
END_OF_TURN = {"llama3_1": "<|eot_id|>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>"}

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Summarise: I burnt the toast."},
     {"role": "assistant", "content": "Toast burnt."}],
    [{"role": "user", "content": "Ünïcode ✓ — 日本語?"}, {"role": "assistant", "content": "はい, ünïcode."},
     {"role": "user", "content": "Say 'assistant'."}, {"role": "assistant", "content": "assistant"},
     {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Toast burnt."}],
    [{"role": "user", "content": "Line one.\nLine two."}, {"role": "assistant", "content": "Two lines:\n- one\n- two"}],
]


def _tok(name: str):
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is not present (../shared holds the real tokenizers)")
    return load_tokenizer(path)


def trained_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for tok_id, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == tok_id  # aligned: a trained token's label is the token itself
            current.append(tok_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def _encode(tok, messages, seq_len=512, template=None, **kw):
    cfg = DataConfig(task="chat", **kw)
    return ChatEncoder(tok, template or tok.chat_template, cfg, seq_len).encode(messages)


@pytest.mark.parametrize("name", ["llama3_1", "qwen3", "gemma3"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_trained_tokens_are_the_assistant_contents_and_end_of_turn(name, conversation):
    tok = _tok(name)
    messages = CONVERSATIONS[conversation]
    encoded = _encode(tok, messages)
    ex = encoded.example
    assert encoded.cut is None and len(ex.input_ids) == len(ex.labels) and ex.labels[0] == IGNORE_INDEX
    expected = [m["content"] + END_OF_TURN[name] for m in messages if m["role"] == "assistant"]
    assert trained_runs(tok, ex.input_ids, ex.labels) == expected
    last = _encode(tok, messages, train_on="last_assistant").example
    assert last.input_ids == ex.input_ids
    assert trained_runs(tok, last.input_ids, last.labels) == expected[-1:]
    everything = _encode(tok, messages, train_on="all").example
    assert everything.labels == [IGNORE_INDEX] + everything.input_ids[1:]


def test_chatml_by_name_on_the_qwen3_tokenizer():
    tok = _tok("qwen3")
    ex = _encode(tok, CONVERSATIONS[1], template=CHATML).example
    assert tok.decode(ex.input_ids).startswith("<|im_start|>user\nÜnïcode")
    assert trained_runs(tok, ex.input_ids, ex.labels) == ["はい, ünïcode.<|im_end|>", "assistant<|im_end|>",
                                                          "Toast burnt.<|im_end|>"]


def test_generation_markers_decide_where_the_template_has_them():
    tok = _tok("qwen3")
    marked = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
              "{% endfor %}")
    ex = _encode(tok, CONVERSATIONS[1], template=marked).example
    assert trained_runs(tok, ex.input_ids, ex.labels) == [m["content"] + "<|im_end|>" for m in CONVERSATIONS[1]
                                                          if m["role"] == "assistant"]


def test_truncation_drops_whole_trailing_exchanges_first():
    tok = _tok("qwen3")
    long = CONVERSATIONS[1][:4] + [{"role": "user", "content": "more " * 80},
                                   {"role": "assistant", "content": "less " * 80}]
    full = _encode(tok, long).example
    encoded = _encode(tok, long, seq_len=60)
    assert len(full.input_ids) > 61 and encoded.cut == "cut the last 2 of 6 messages to fit 61 tokens"
    assert not encoded.cut_inside and len(encoded.example.input_ids) <= 61
    assert trained_runs(tok, encoded.example.input_ids, encoded.example.labels) == ["はい, ünïcode.<|im_end|>",
                                                                                    "assistant<|im_end|>"]


def test_a_first_exchange_too_long_cuts_its_user_message_and_keeps_the_answer():
    tok = _tok("qwen3")
    long_question = [{"role": "user", "content": "why " * 100}, {"role": "assistant", "content": "because"}]
    encoded = _encode(tok, long_question, seq_len=40)
    ex = encoded.example
    assert encoded.cut_inside and encoded.cut.startswith("cut user message 0 to its first ")
    n_words = len(tok.encode("why " * 100))
    assert encoded.cut.endswith(f" of {n_words} tokens to fit 41 tokens") and 35 <= len(ex.input_ids) <= 41
    assert trained_runs(tok, ex.input_ids, ex.labels) == ["because<|im_end|>"]
    assert tok.decode(ex.input_ids).startswith("<|im_start|>user\nwhy why why")
    longer = _encode(tok, long_question, seq_len=41).example  # one more token of room: the longest start that fits
    assert len(longer.input_ids) >= len(ex.input_ids)
    long_answer = [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "because " * 100}]
    kept = _encode(tok, long_answer, seq_len=40)
    assert kept.cut_inside and len(kept.example.input_ids) == 41 and kept.example.trained > 20
    assert kept.cut.startswith("cut the first exchange at 41 of ")


def test_nothing_left_to_train_is_dropped_and_a_data_set_of_such_is_an_error(caplog):
    tok = _tok("qwen3")
    long_system = [{"role": "system", "content": "rule " * 100}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "ok"}]
    encoded = _encode(tok, long_system, seq_len=40)
    n = len(_encode(tok, long_system).example.input_ids)
    assert encoded.example is None and encoded.cut_inside
    assert encoded.cut == f"cut the first exchange at 41 of {n} tokens"
    assert encoded.dropped == "no assistant token left after the cut to seq_len"
    short = [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "because"}]
    records = [{"messages": long_system}] * 3 + [{"messages": short}]
    with pytest.raises(DataError, match=r"no example with a token to train from 3 records of x.jsonl \(3 with no "
                                        r"assistant token left after the cut to seq_len\); 3 were cut to seq_len 40: "
                                        r"raise seq_len"):
        build_examples(records[:3], DataConfig(source="x.jsonl", task="chat"), tok, seq_len=40)
    examples = build_examples(records, DataConfig(source="x.jsonl", task="chat"), tok, seq_len=40)
    assert len(examples) == 1
    assert "3 of 4 examples (75%) have no token to train and were dropped: 3 with no assistant token" in caplog.text


def test_a_conversation_without_an_assistant_turn_is_dropped():
    tok = _tok("qwen3")
    silent = "{% for m in messages %}{% endfor %}"
    assert _encode(tok, CONVERSATIONS[0], template=silent, train_on="all").dropped == "the template rendered no text"
    assert _encode(tok, [{"role": "user", "content": "hi"}]).dropped == "no assistant message"
    assert _encode(tok, [{"role": "user", "content": "hi"}], train_on="all").example.trained > 0


def test_a_template_without_an_end_of_turn_token_is_refused():
    tok = _tok("qwen3")
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(DataError, match="no special token.*never learn to stop"):
        _encode(tok, CONVERSATIONS[0], template=plain)
    llama2 = _tok("llama2")  # ChatML text on a tokenizer without <|im_end|>: it is not one special token
    with pytest.raises(DataError, match="no special token"):
        _encode(llama2, CONVERSATIONS[0], template=CHATML)


def test_a_base_model_without_a_template_says_what_to_do():
    tok = _tok("llama2")
    assert tok.chat_template is None
    with pytest.raises(DataError, match="has no chat template.*data.chat_template.*chatml"):
        build_examples([{"messages": CONVERSATIONS[0]}], DataConfig(source="x.jsonl", task="chat"), tok, 64)


# --- formats ---------------------------------------------------------------------------------------------------

def _ids(tok, records, **kw):
    return [(e.input_ids, e.labels) for e in build_examples(records, DataConfig(source="x.jsonl", task="chat", **kw),
                                                            tok, 256)]


def test_sharegpt_alpaca_template_and_renamed_fields_equal_messages():
    tok = _tok("qwen3")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fix: teh"},
                {"role": "assistant", "content": "the"}]
    expected = _ids(tok, [{"messages": messages}])
    share = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
             for m in messages]
    assert _ids(tok, [{"conversations": share}]) == expected
    assert _ids(tok, [{"instruction": "Fix: teh", "output": "the", "input": ""}], system_prompt="Be brief.") == expected
    assert _ids(tok, [{"instruction": "Fix:", "input": "teh", "output": "the", "system": "Be brief."}]) == \
        _ids(tok, [{"messages": [messages[0], {"role": "user", "content": "Fix:\n\nteh"}, messages[2]]}])
    renamed = [{"speaker": m["role"], "text": m["content"]} for m in messages]
    assert _ids(tok, [{"dialog": renamed}], fields={"messages": "dialog", "role": "speaker", "content": "text"},
                chat_format="messages") == expected
    assert _ids(tok, [{"q": "Fix: teh", "a": "the"}], chat_format="template", prompt_template="{q}",
                completion_template="{a}", system_prompt="Be brief.") == expected


def test_reddit_posts_as_chat(reddit_path=TOKENIZERS.parents[0] / "data" / "reddit_tifu_long" / "train.jsonl"):
    if not reddit_path.is_file():
        pytest.skip(f"{reddit_path} is not present")
    tok = _tok("qwen3")
    cfg = DataConfig(source=str(reddit_path), task="chat", chat_format="template",
                     prompt_template="Summarise this post in one line.\n\n{documents}", completion_template="{tldr}")
    records = [json.loads(line) for line in reddit_path.read_text(encoding="utf-8").splitlines()[:40]]
    encoded = encode_records(records, cfg, tok, 256, str(reddit_path))
    for record, e in zip(records, encoded):
        if e.example is not None and not e.cut:
            assert trained_runs(tok, e.example.input_ids, e.example.labels) == [record["tldr"] + "<|im_end|>"]
    assert sum(e.cut is not None for e in encoded) > 5  # long posts lose their end
    assert all(e.example.trained > 0 for e in encoded if e.example is not None)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', r"line 2: message 0 has the unknown role 'wizard'"),
    ('{"messages": [{"role": "user"}]}', r"line 2: message 0 \(user\) has no content"),
    ('{"messages": "hello"}', r"line 2: 'messages' must be a non-empty list of messages"),
    ('{"messages": []}', r"line 2: 'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', r"line 2: message 0 must be an object"),
    ('{"messages": [{"role": "user", "content": 5}]}', r"line 2: message 0 \(user\) content must be text"),
    ('{"text": "hi"}', r"cannot tell the chat format.*text"),
])
def test_bad_conversations_name_their_line(tmp_path, line, message):
    from loratune.data import prepare_data

    tok = _tok("qwen3")
    good = json.dumps({"messages": CONVERSATIONS[0]})
    path = tmp_path / "chat.jsonl"
    path.write_text(good + "\n" + line + "\n" if "cannot tell" not in message else line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        prepare_data(DataConfig(source=str(path), task="chat", val_fraction=0), tok, 64, seed=0)


def test_a_template_that_raises_names_the_line(tmp_path):
    tok = _tok("qwen3")
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system "
                        "messages') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    records = [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[0]}]
    with pytest.raises(DataError, match=r"record 2: the chat template raised an error.*no system messages"):
        build_examples(records, DataConfig(source="x.jsonl", task="chat", chat_template=str(template)), tok, 64)
