"""Reading records: a local file (.jsonl, .json, .csv, .parquet, .txt) or a Hugging Face hub data set."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from types import ModuleType

from ..errors import DataError
from ..hub.resolve import is_hub_id
from .config import DataConfig

log = logging.getLogger(__name__)

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


class Record(dict):
    """One record, and where it came from ('line 12', 'row 3'), so an error can name it."""

    where = "a record"


def _placed(records: list[dict], where: str, first: int = 1) -> list[dict]:
    """The records as :class:`Record` s named ``f"{where} {i}"`` from ``first`` on."""
    placed = []
    for i, record in enumerate(records, first):
        record = Record(record)
        record.where = f"{where} {i}"
        placed.append(record)
    return placed


def record_place(record: dict, index: int) -> str:
    """Where ``record`` came from ('line 12'), or its position ('record 4') when it is a plain dict."""
    return getattr(record, "where", f"record {index + 1}")


def _looks_local(source: str) -> bool:
    return (Path(source).expanduser().exists() or Path(source).suffix.lower() in FILE_TYPES
            or source.startswith((".", "/", "~")) or not is_hub_id(source))


def load_records(source: str, cfg: DataConfig, split: str | None = None) -> list[dict]:
    """Read a data set as a list of dicts, one per record.

    A local file is read by its extension: .jsonl (one JSON object a line), .json (a list of
    objects, or {"data": [...]}), .csv (header row = field names, values are strings),
    .parquet (needs pyarrow), .txt (one record {"text": line} per non-empty line). Anything
    else shaped like 'user/name' is a hub id, loaded with
    ``datasets.load_dataset(source, cfg.hub_config, split=split or cfg.split)``; a script-based
    one, which ``datasets`` >= 4 refuses, is read from the hub's Parquet export instead.
    """
    if not _looks_local(source):
        records = _placed(_load_hub(source, cfg.hub_config, split or cfg.split), "row")
        where = f"hub data set {source!r} (split {split or cfg.split!r})"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        if not path.is_file():
            raise DataError(f"{path} is not a file; pass a {'/'.join(FILE_TYPES)} file or a hub data set id")
        kind = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
                   ".parquet": _read_parquet, ".txt": _read_txt}
        if kind not in readers:
            raise DataError(f"cannot read {path}: unknown extension {kind!r}; use one of {', '.join(FILE_TYPES)}")
        try:
            records = readers[kind](path)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text: {exc}") from None
        where = str(path)
    if not records:
        raise DataError(f"the data is empty: no records in {where}")
    return records


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            except (ValueError, RecursionError) as exc:  # a number past 4300 digits, nesting past the recursion limit
                raise DataError(f"{path}, line {lineno}: unreadable JSON ({exc})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            record = Record(record)
            record.where = f"line {lineno}"
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # a number past 4300 digits, nesting past the recursion limit
        raise DataError(f"{path}: unreadable JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path} must hold a list of JSON objects, or an object {{\"data\": [...]}}")
    return _placed(data, "record")


MAX_FIELD_NAME_CHARS = 200
"""Longest CSV header cell taken as a field name; a longer one is a record's text, not a name."""


def _read_csv(path: Path) -> list[dict]:
    old_limit = csv.field_size_limit(2**31 - 1)  # long documents exceed the 128 KiB default
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            lines = _RowLines(f)
            reader = csv.DictReader(lines)
            if reader.fieldnames is None:  # an empty file
                return []
            check_csv_header(path, list(reader.fieldnames))
            rows = []
            lines.kept = []
            for row in reader:
                rows.append(dict(row))
                last, lines.kept = lines.kept, []
            if rows:
                check_csv_quotes(path, "".join(last), reader.line_num)
            return _placed(rows, "row")
    except csv.Error as exc:
        raise DataError(f"{path} is not valid CSV: {exc}") from None
    finally:
        csv.field_size_limit(old_limit)


class _RowLines:
    """The lines of a file, keeping those read since ``kept`` was last emptied (the current CSV row's)."""

    def __init__(self, f) -> None:
        self.f, self.kept = f, []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.f)
        self.kept.append(line)
        return line


def check_csv_quotes(path: Path, last_row: str, lines: int) -> None:
    """Refuse a CSV whose last row opens a quote that is never closed, naming the line where it opens.

    Why: Python's csv reader then takes everything up to the end of the file, line breaks and
    later rows included, as one field, and a data set silently loses its last rows into one giant
    text. Only the last row can be unterminated (it runs to the end of the file); ``last_row`` is
    its text and ``lines`` the file's line count.
    """
    try:
        for _ in csv.reader(io.StringIO(last_row), strict=True):
            pass
        return
    except csv.Error as exc:
        if "unexpected end of data" not in str(exc):
            return  # a looser problem (text after a closing quote) that the non-strict reader accepted
    line = lines - last_row.count("\n", max(_open_quote(last_row), 0)) + last_row.endswith("\n")
    raise DataError(f"{path}, line {line}: a quoted field opens on this line and is never closed, so the rest of "
                    "the file would be read as one field; close the quote (a quote inside a quoted field is "
                    "written twice: \"\")")


def _open_quote(text: str) -> int:
    """Where the quoted field that ``text`` ends inside opens (csv's quoting rules, ',' delimiter)."""
    at, i, n, start = -1, 0, len(text), True
    while i < n:
        c = text[i]
        if start and c == '"':
            at = i
            close = i + 1
            while True:  # to the closing quote: a '"' not followed by another
                close = text.find('"', close)
                if close < 0:
                    return at
                if text.startswith('""', close):
                    close += 2
                    continue
                break
            i, start = close + 1, False
            continue
        start = c in ",\r\n"
        i += 1
    return at


def check_csv_header(path: Path, names: list[str]) -> None:
    """Refuse a CSV whose first row does not look like field names.

    Why: the first row is always read as the header, so a file without one turns its first
    record into "field names", and the missing-field error that follows lists a whole post as
    the fields on offer. A name is refused if it is over 200 characters or holds a line break,
    and the row if it has no name at all; single empty cells pass (pandas writes one for its index).
    """
    if not any(n.strip() for n in names):
        problem = "it is empty"
    elif any(len(n) > MAX_FIELD_NAME_CHARS for n in names):
        problem = f"a cell over {MAX_FIELD_NAME_CHARS} characters looks like data, not a name"
    elif any("\n" in n or "\r" in n for n in names):
        problem = "a cell with a line break looks like data, not a name"
    else:
        return
    shown = ", ".join(repr(_shorten(n, 40)) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    raise DataError(f"{path}: the CSV's first row is used as field names, but {problem} ({shown or 'no cells'}); "
                    "add a header row naming the fields, e.g. text,summary")


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())  # line breaks shown as spaces: the message stays one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow, or convert it to .jsonl") from None
    try:
        return _placed(pq.read_table(path).to_pylist(), "row")
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path} is not a readable parquet file: {exc}") from None


def _read_txt(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                records.append(Record(text=line.rstrip("\r\n")))
                records[-1].where = f"line {lineno}"
    return records


PARQUET_REVISION = "refs/convert/parquet"
"""Git revision where the hub keeps its automatic Parquet export of a data set: one folder per config."""


def _load_hub(source: str, config: str | None, split: str) -> list[dict]:
    """Load ``split`` of hub data set ``source`` (config ``config``) as a list of dicts.

    Why the fallback: ``datasets`` >= 4 no longer runs loading scripts, and some data sets, like
    the README's ``ctr4si/reddit_tifu``, are still script-based. The hub keeps an automatic Parquet
    export of most of them on the ``refs/convert/parquet`` revision, so when the library refuses a
    script we read that export instead (see :func:`_load_parquet_export`).
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source!r} is not a local file, and loading hub data sets needs the 'datasets' "
                        "package: pip install datasets, or pass a local .jsonl file") from None
    try:
        return datasets.load_dataset(source, config, split=split).to_list()
    except Exception as exc:  # network, missing data set, bad config or split: all mean "could not get it"
        if not _is_script_error(exc):
            raise DataError(f"could not load hub data set {source!r} (config {config!r}, split {split!r}): "
                            f"{type(exc).__name__}: {exc}. Check the id and your connection, "
                            "or pass a local .jsonl/.json/.csv/.parquet/.txt file") from None
    return _load_parquet_export(datasets, source, config, split)


def _is_script_error(exc: Exception) -> bool:
    """True for the error ``datasets`` >= 4 raises for a script-based data set.

    ``datasets.load.dataset_module_factory`` raises
    ``RuntimeError(f"Dataset scripts are no longer supported, but found {filename}")``.
    """
    return isinstance(exc, RuntimeError) and "Dataset scripts are no longer supported" in str(exc)


def _load_parquet_export(datasets: ModuleType, source: str, config: str | None, split: str) -> list[dict]:
    """Load ``split`` of ``config`` from the hub's Parquet export of a script-based data set.

    The export is a plain Parquet repository (no script) with one folder per config
    (``long/train/0000.parquet``); a script without named configs is exported as ``default``.
    ``data_dir`` picks the config folder, and ``datasets`` infers the split from the folder below
    it. That inference also maps the ``partial-train`` / ``partial-validation`` / ``partial-test``
    folders, which the converter writes when it exported only the first part of a large split,
    to train/validation/test, so those load too, but hold only part of the data. Only those
    split names (and synonyms such as dev/valid/eval) are inferred from folders; a folder holding
    only other split names is read whole as 'train'.
    """
    folder = config or "default"
    log.info("%s is a script-based data set, which datasets>=4 no longer runs; loading its Parquet "
             "export (revision %s, folder %r, split %r) instead", source, PARQUET_REVISION, folder, split)
    try:
        return datasets.load_dataset(source, revision=PARQUET_REVISION, data_dir=folder, split=split).to_list()
    except Exception as exc:  # no export, no such config folder or split, network
        raise DataError(
            f"hub data set {source!r} is script-based, and datasets>=4 no longer runs data set scripts; "
            f"no usable Parquet export was found at {PARQUET_REVISION} (folder {folder!r}, split {split!r}): "
            f"{type(exc).__name__}: {_brief(exc)}. Pin the older library (pip install 'datasets<4'), or "
            "download/convert the data to a local .jsonl or .parquet file and pass it with --data") from None


def _brief(exc: Exception, limit: int = 300) -> str:
    """The first line of an exception's message, cut to ``limit`` characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
