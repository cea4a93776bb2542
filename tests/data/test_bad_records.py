"""Records that would train silently wrong are refused, naming where they are: an unterminated CSV
quote (which swallows the rest of the file), a number or NaN where text belongs, and prompt templates
that reach past a record's plain fields."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loratune.data import DataConfig, build_examples, load_records
from loratune.data.chat_formats import fill_template
from loratune.data.tokenizer import load_tokenizer
from loratune.errors import ConfigError, DataError

TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"


@pytest.fixture(scope="module")
def tok():
    path = TOKENIZERS / "qwen3"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is not present (../shared holds the real tokenizers)")
    return load_tokenizer(path)


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.csv"
    path.write_bytes(text.encode("utf-8"))
    return path


# --- CSV quotes --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line", [
    ('text,summary\n"one",a\n"two,b\nthree,c\nfour,d\n', 3),
    ('text,summary\r\n"one",a\r\n"two,b\r\nthree,c\r\n', 3),
    ('text,summary\none,"a\n', 2),
    ('text,summary\none,"a', 2),
    ('text,summary\n"one",a\nx,"two\n""q"" ""\nthree,c\nfour,d', 3),
    ('text,summary\n"multi\nline",ok\n\nx,"y\nz', 5),
], ids=["mid-file", "crlf", "last-line", "no-final-newline", "escaped-quotes-inside", "after-a-multiline-row"])
def test_an_unterminated_quote_is_refused_naming_its_line(tmp_path, text, line):
    path = _csv(tmp_path, text)
    with pytest.raises(DataError, match=f"data.csv, line {line}: a quoted field opens on this line and is never "
                                        "closed"):
        load_records(str(path), DataConfig(source=str(path)))


def test_closed_quotes_over_several_lines_still_load(tmp_path):
    path = _csv(tmp_path, 'text,summary\n"two\nlines, and ""quotes""",b\n"last ""one""",c\n')
    records = load_records(str(path), DataConfig(source=str(path)))
    assert records == [{"text": 'two\nlines, and "quotes"', "summary": "b"}, {"text": 'last "one"', "summary": "c"}]
    assert [r.where for r in records] == ["row 1", "row 2"]


# --- text fields that are not text --------------------------------------------------------------

@pytest.mark.parametrize("value, shown", [(math.nan, "float nan"), (12345, "int 12345"), (True, "bool True"),
                                          (["a"], "a list of 1"), ({"a": 1}, "an object of 1")])
def test_a_causal_lm_text_that_is_not_text_is_refused_naming_the_line(tmp_path, tok, value, shown):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"documents": "fine"}) + "\n\n" + json.dumps({"documents": value}) + "\n")
    records = load_records(str(path), DataConfig(source=str(path)))
    with pytest.raises(DataError, match=f"data.jsonl, line 3: field 'documents' must be text, got {shown}"):
        build_examples(records, DataConfig(source=str(path)), tok, seq_len=16)


def test_json_nan_and_numbers_are_refused_in_completion_and_template_chat(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_text('{"documents": "a post", "tldr": "ok"}\n{"documents": NaN, "tldr": "ok"}\n'
                    '{"documents": "b", "tldr": 12345}\n')
    records = load_records(str(path), DataConfig(source=str(path)))
    with pytest.raises(DataError, match="line 2: field 'documents' must be text, got float nan"):
        build_examples(records, DataConfig(source=str(path), task="completion"), tok, seq_len=16)
    with pytest.raises(DataError, match="line 3: field 'tldr' must be text, got int 12345"):
        build_examples([records[0], records[2]], DataConfig(source=str(path), task="completion"), tok, seq_len=16)
    chat = DataConfig(source=str(path), task="chat", chat_format="template", chat_template="chatml")
    with pytest.raises(DataError, match="line 2: field 'documents' must be text, got float nan"):
        build_examples(records, chat, tok, seq_len=64)


def test_empty_and_missing_texts_are_still_skipped_with_a_notice(tok, caplog):
    records = [{"documents": "one"}, {"documents": ""}, {"documents": None}, {"other": "x"}]
    assert len(build_examples(records, DataConfig(source="x.jsonl"), tok, seq_len=8)) == 1
    assert "skipped 3 of 4" in caplog.text


# --- prompt templates: plain field names only ---------------------------------------------------

@pytest.mark.parametrize("template, shown", [
    ("{documents.__class__.__mro__[1].__subclasses__}", "{documents.__class__.__mro__[1].__subclasses__}"),
    ("{documents.upper}", "{documents.upper}"),
    ("{documents[0]}", "{documents[0]}"),
    ("{documents!r}", "{documents!r}"),
    ("{documents:>99999999999}", "{documents:>99999999999}"),
    ("{documents:{tldr}}", "{documents:{tldr}}"),
])
def test_a_prompt_template_may_only_name_plain_fields(template, shown):
    for key in ("prompt_template", "completion_template"):
        with pytest.raises(ConfigError, match="is not a plain field name; a template may only name record fields") \
                as caught:
            DataConfig(**{key: template})
        assert key in str(caught.value) and shown in str(caught.value)
    with pytest.raises(ConfigError, match="not a plain field name"):
        fill_template(template, {"documents": "x", "tldr": "y"}, "line 1")


def test_plain_templates_fill_as_str_format_did():
    record = {"documents": "a post", "tldr": "short", "my field": "ok"}
    for template in ("{documents}\nTL;DR: ", "Q: {documents} {{literal}} A: {tldr}", "{my field}", "no fields"):
        DataConfig(prompt_template=template)
        assert fill_template(template, record, "line 1") == template.format(**record)
