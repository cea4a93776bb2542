"""loratune/data/sources.py: a CSV without a header row is named as such, not listed as "field names".

The first row of a CSV is always read as its header; a file that starts with a record instead
would otherwise surface as a missing-field error that lists a whole post as the fields on offer.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from loratune.data import DataConfig, load_records
from loratune.errors import DataError

POST = ("today i tried to fix the sink myself, and after two hours of watching videos i flooded the kitchen, "
        "the hallway and, somehow, the neighbour's ceiling below us")


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _load(path: Path) -> list[dict]:
    return load_records(str(path), DataConfig(source=str(path), text_field="text"))


def test_a_csv_whose_first_row_is_a_long_record_is_refused(tmp_path):
    path = _write(tmp_path / "posts.csv", [[POST + " " + POST, "flooded the flat", "7", "extra"],
                                           ["another post", "short", "3", "x"]])
    with pytest.raises(DataError) as info:
        _load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: the CSV's first row is used as field names, but a cell over 200 "
                              "characters looks like data, not a name (")
    assert "'today i tried to fix the sink myself,...', 'flooded the flat', '7', ..." in message
    assert message.endswith("add a header row naming the fields, e.g. text,summary")


def test_a_header_cell_with_a_line_break_is_refused(tmp_path):
    path = _write(tmp_path / "posts.csv", [["first line\nsecond line", "tldr"], ["a", "b"]])
    with pytest.raises(DataError, match="a cell with a line break looks like data.*'first line second line', 'tldr'"):
        _load(path)


def test_an_empty_first_row_is_refused(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("\ntext,tldr\nhello,hi\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"first row is used as field names, but it is empty \(no cells\); add a header row"):
        _load(path)


def test_ordinary_headers_still_load(tmp_path):
    """Short names pass, and so does pandas' empty index-column name."""
    path = _write(tmp_path / "ok.csv", [["", "text", "tldr"], ["0", POST, "flood"], ["1", "b", "c"]])
    assert _load(path) == [{"": "0", "text": POST, "tldr": "flood"}, {"": "1", "text": "b", "tldr": "c"}]
    long_name = _write(tmp_path / "long.csv", [["x" * 200], ["value"]])
    assert _load(long_name) == [{"x" * 200: "value"}]
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="the data is empty"):
        _load(empty)
