"""README.md's performance tables are the results files, row for row.

Every ``<!-- table: PATH -->`` ... ``<!-- end table -->`` block in README.md must equal what
``python benchmarks/report_tables.py PATH`` prints for that results JSON; each table has one row
per measured job; and every results JSON in benchmarks/results/ has a block. Offline, no torch.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"^<!-- table: (?P<path>\S+) -->\n(?P<body>.*?)\n<!-- end table -->$", re.DOTALL | re.MULTILINE)


def _load_report_tables():
    spec = importlib.util.spec_from_file_location("report_tables", ROOT / "benchmarks" / "report_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_tables = _load_report_tables()


def readme_blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for m in BLOCK.finditer(README.read_text(encoding="utf-8")):
        assert m["path"] not in blocks, f"README.md has two table blocks for {m['path']}"
        blocks[m["path"]] = m["body"]
    return blocks


def data_rows(markdown: str) -> list[str]:
    """Table lines that are neither a header nor a |---| separator (counted here, not by the module)."""
    lines = markdown.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.startswith("|") or line.startswith("|---"):
            continue
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            continue  # a header
        rows.append(line)
    return rows


BLOCKS = readme_blocks()


def test_readme_has_table_blocks():
    assert BLOCKS, "no <!-- table: ... --> blocks in README.md"


def test_every_results_file_has_a_block():
    files = sorted(p.relative_to(ROOT).as_posix() for p in RESULTS.glob("*.json"))
    assert files, "no results JSON in benchmarks/results"
    missing = [f for f in files if f not in BLOCKS]
    assert not missing, f"README.md has no generated table for {missing}"


@pytest.mark.parametrize("path", sorted(BLOCKS))
def test_block_equals_the_generated_tables(path):
    assert (ROOT / path).is_file(), f"README.md names {path}, which does not exist"
    expected = report_tables.render_file(ROOT / path)
    assert BLOCKS[path] == expected, (
        f"README.md's table for {path} is not what the results file gives; regenerate it with "
        f"`python benchmarks/report_tables.py --markers {path}`")


@pytest.mark.parametrize("path", sorted(BLOCKS))
def test_one_row_per_measured_job(path):
    result = json.loads((ROOT / path).read_text())
    jobs = len(result.get("train") or []) + len(result.get("generate") or []) + len(result.get("rows") or [])
    assert jobs > 0
    assert len(data_rows(BLOCKS[path])) == jobs == report_tables.count_jobs(result)
    assert len(data_rows(report_tables.render(result))) == jobs


def test_slower_and_failed_rows_are_shown():
    """A row where loratune is slower, a failed side and a missing side all get a row of their own."""
    side = {"tokens_per_s": 100.0, "peak_memory": 2**30, "final_loss": 2.0, "runs": 1, "errors": []}
    slow = {**side, "tokens_per_s": 50.0, "runs": 3}
    failed = {"tokens_per_s": None, "peak_memory": None, "final_loss": None, "runs": 0,
              "errors": ["RuntimeError: out of | memory"]}
    result = {
        "machine": {"cpu": "test cpu", "cores": 2},
        "args": {"cases": "lora-qv", "precisions": "fp32", "seqs": "128,256,512", "sizes": "124m", "batch": 4,
                 "gen": "1", "gen_precisions": "fp32", "repeats": 2},
        "train": [
            {"case": "lora-qv", "precision": "fp32", "group": "fp32", "seq": 128, "size": "124m",
             "loratune": slow, "peft": {**side, "runs": 3}},
            {"case": "lora-qv", "precision": "fp32", "group": "fp32", "seq": 256, "size": "124m",
             "loratune": side, "peft": failed},
            {"case": "lora-qv", "precision": "fp32", "group": "fp32", "seq": 512, "size": "124m", "loratune": side},
        ],
        "generate": [{"batch": 1, "precision": "fp32", "loratune": {"tokens_per_s": 10.0, "errors": ["boom"]},
                      "transformers": {"tokens_per_s": 5.0, "errors": []}}],
    }
    text = report_tables.render(result)
    rows = data_rows(text)
    assert len(rows) == 4
    assert "0.50x (slower)" in rows[0] and "3 (median)" in rows[0] and "batch 4" in rows[0]
    assert "| failed |" in rows[1] and "out of \\| memory" in rows[1] and "2.00 GiB" not in rows[1]
    assert "| missing |" in rows[2]
    assert "ours 1 (single run), peer 2 (median); 1 failed" in rows[3]
    assert "slower than the peer in 1 of 3 training rows (2 with a failed side)" in text
    assert report_tables.render(result) == text  # deterministic


def test_cli_prints_the_tables(capsys):
    path = min(RESULTS.glob("*.json"))
    assert report_tables.main([str(path)]) == 0
    assert capsys.readouterr().out.rstrip("\n") == report_tables.render_file(path)
