"""Hub data sets that are script-based: the fallback to the hub's Parquet export (offline).

``datasets`` >= 4 refuses data set scripts; ``loratune.data.sources`` then loads the automatic
Parquet export on the ``refs/convert/parquet`` revision. The hub is replaced by a fake
``datasets.load_dataset`` here; the last tests run the real library on local stand-ins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from loratune.data import DataConfig, load_records
from loratune.data.sources import PARQUET_REVISION, _is_script_error
from loratune.errors import DataError

datasets = pytest.importorskip("datasets")

HUB_ID = "ctr4si/reddit_tifu"
RECORDS = [
    {"documents": "i tried to cook pasta and set the kitchen on fire.", "tldr": "burned pasta"},
    {"documents": "my cat walked over the keyboard.", "tldr": "the cat sent it"},
    {"documents": "ünïcödé survives", "tldr": "bytes are fine"},
]


def script_error(path: str) -> RuntimeError:
    """The error datasets >= 4 raises for a script-based data set, built as
    ``datasets.load.dataset_module_factory`` builds it (file name = last path part + '.py')."""
    filename = [part for part in path.replace(os.sep, "/").split("/") if part][-1]
    if not filename.endswith(".py"):
        filename += ".py"
    return RuntimeError(f"Dataset scripts are no longer supported, but found {filename}")


class FakeHub:
    """Stand-in for ``datasets.load_dataset``: records each call, then raises or answers per ``answers``."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        answer = self.answers[len(self.calls) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer() if callable(answer) else answer


def install(monkeypatch, *answers) -> FakeHub:
    fake = FakeHub(*answers)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def cfg(**kw) -> DataConfig:
    return DataConfig(source=HUB_ID, **kw)


def test_script_error_falls_back_to_parquet_export(monkeypatch, caplog):
    fake = install(monkeypatch, script_error(HUB_ID), datasets.Dataset.from_list(RECORDS))
    with caplog.at_level(logging.INFO, logger="loratune.data.sources"):
        records = load_records(HUB_ID, cfg(hub_config="long", split="train"))
    assert records == RECORDS
    assert len(fake.calls) == 2
    assert fake.calls[0] == ((HUB_ID, "long"), {"split": "train"})
    args, kwargs = fake.calls[1]
    assert args == (HUB_ID,)
    assert kwargs == {"revision": "refs/convert/parquet", "data_dir": "long", "split": "train"}
    assert "Parquet export" in caplog.text and HUB_ID in caplog.text


def test_fallback_keeps_the_requested_split(monkeypatch):
    fake = install(monkeypatch, script_error(HUB_ID), datasets.Dataset.from_list(RECORDS[:1]))
    assert load_records(HUB_ID, cfg(), split="validation") == RECORDS[:1]
    assert fake.calls[1][1]["split"] == "validation"
    assert fake.calls[1][1]["data_dir"] == "long"


def test_no_config_uses_the_default_folder(monkeypatch):
    fake = install(monkeypatch, script_error(HUB_ID), datasets.Dataset.from_list(RECORDS))
    assert load_records(HUB_ID, cfg(hub_config=None)) == RECORDS
    assert fake.calls[0] == ((HUB_ID, None), {"split": "train"})
    assert fake.calls[1][1] == {"revision": PARQUET_REVISION, "data_dir": "default", "split": "train"}


@pytest.mark.parametrize("error", [
    ConnectionError("Couldn't reach 'ctr4si/reddit_tifu' on the Hub (OfflineModeIsEnabled)"),
    ValueError("Unknown split \"dev\". Should be one of ['train']."),
    RuntimeError("something else went wrong"),
])
def test_other_errors_are_not_retried(monkeypatch, error):
    fake = install(monkeypatch, error)
    with pytest.raises(DataError, match=r"could not load hub data set 'ctr4si/reddit_tifu' \(config 'long', "
                                        r"split 'train'\)") as info:
        load_records(HUB_ID, cfg())
    assert len(fake.calls) == 1
    assert type(error).__name__ in str(info.value) and "local" in str(info.value)
    assert "script" not in str(info.value)


def test_failed_retry_explains_and_suggests_a_local_file(monkeypatch):
    missing = datasets.exceptions.DatasetNotFoundError(
        f"Revision '{PARQUET_REVISION}' doesn't exist for dataset '{HUB_ID}' on the Hub.")
    fake = install(monkeypatch, script_error(HUB_ID), missing)
    with pytest.raises(DataError) as info:
        load_records(HUB_ID, cfg())
    assert len(fake.calls) == 2
    msg = str(info.value)
    assert f"'{HUB_ID}'" in msg and "script-based" in msg and "datasets>=4" in msg
    assert PARQUET_REVISION in msg and "DatasetNotFoundError" in msg and "doesn't exist" in msg
    assert "datasets<4" in msg and "local .jsonl or .parquet file" in msg and "--data" in msg


def test_real_script_error_is_recognised(tmp_path):
    # A local directory holding only a loading script, like a script-based hub repo: the REAL
    # datasets code raises its script error (offline, before any network access).
    repo = tmp_path / "reddit_tifu"
    repo.mkdir()
    (repo / "reddit_tifu.py").write_text("# a legacy loading script\n", encoding="utf-8")
    with pytest.raises(Exception) as info:
        datasets.load_dataset(str(repo), "long", split="train", cache_dir=str(tmp_path / "cache"))
    assert _is_script_error(info.value)
    assert type(info.value) is type(script_error(str(repo)))
    assert str(info.value) == str(script_error(str(repo)))
    assert not _is_script_error(RuntimeError("other")) and not _is_script_error(ValueError(str(info.value)))


def write_export(root: Path) -> Path:
    """A local copy of a Parquet export's layout: ``<config>/<split>/0000.parquet``."""
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    layout = {"long/train": RECORDS[:2], "long/test": RECORDS[2:],
              "short/partial-train": RECORDS[1:], "short/partial-validation": RECORDS[:1]}
    for folder, rows in layout.items():
        (root / folder).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / folder / "0000.parquet")
    return root


@pytest.mark.parametrize("data_dir, split, expected", [
    ("long", "train", RECORDS[:2]),
    ("long", "test", RECORDS[2:]),
    ("short", "train", RECORDS[1:]),          # a partially exported split: partial-train -> train
    ("short", "validation", RECORDS[:1]),
])
def test_real_loader_reads_the_export_layout(tmp_path, monkeypatch, data_dir, split, expected):
    # The same data_dir + split-folder inference runs for a hub repo (base path
    # hf://datasets/<id>@<sha>/<data_dir>) and for a local directory: datasets.data_files.get_data_patterns.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    export = write_export(tmp_path / "export")
    ds = datasets.load_dataset(str(export), data_dir=data_dir, split=split, cache_dir=str(tmp_path / "cache"))
    assert ds.to_list() == expected


def test_fallback_end_to_end_on_local_stand_ins(tmp_path, monkeypatch):
    # The hub id is mapped to local stand-ins and everything else is the real datasets code: the
    # first call hits a script-based repo, the retry's arguments are applied to an export copy.
    real_load = datasets.load_dataset
    script_repo = tmp_path / "reddit_tifu"
    script_repo.mkdir()
    (script_repo / "reddit_tifu.py").write_text("# a legacy loading script\n", encoding="utf-8")
    export = write_export(tmp_path / "export")
    cache = str(tmp_path / "cache")
    calls = []

    def hub(path, name=None, *, revision=None, **kwargs):
        calls.append(revision)
        target = export if revision == PARQUET_REVISION else script_repo
        return real_load(str(target), name, cache_dir=cache, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert load_records(HUB_ID, cfg(hub_config="long", split="train")) == RECORDS[:2]
    assert load_records(HUB_ID, cfg(hub_config="short", split="train")) == RECORDS[1:]
    assert calls == [None, PARQUET_REVISION] * 2
    with pytest.raises(DataError, match="no usable Parquet export.*'medium'"):
        load_records(HUB_ID, cfg(hub_config="medium"))
