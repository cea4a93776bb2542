"""benchmarks/gpu_run.py, the one command a lent GPU runs, checked where no GPU is: its dry run on the CPU (the
same code paths with tiny shapes) must write every section with measured rows or a stated reason, and no row may
fail, so the script cannot rot between the sessions that are lent a device. Also its budget (rows past it are
skipped with the reason) and its summary against the goals, on made-up rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_run
import report_gpu


def _pair(speed: float, memory: float, **key) -> list[dict]:
    base = {"shape": "s", "case": "lora", "compile": False, "seq": 64, "batch": 1, "roofline_share": 0.5, **key}
    ours = {**base, "side": "loratune", "tokens_per_s": 100.0 * speed, "peak": {"allocated": memory * 2**30}}
    return [ours, {**base, "side": "transformers+peft", "tokens_per_s": 100.0, "peak": {"allocated": 2**30}}]


def test_summary_states_each_goal_met_or_not():
    rows = _pair(2.0, 0.4) + _pair(1.2, 0.7, case="qlora") + [
        {"shape": "s", "case": "lora", "compile": True, "seq": 64, "batch": 1, "side": "loratune",
         "skipped": "not available: no compile field"}]
    result = {"sections": {"train": {"rows": rows[:4]}, "train_compile": {"rows": rows[4:]},
                           "serve": {"skipped": "no time"}}}
    lines = report_gpu.summary_lines(result)
    assert any("lora eager: tokens/s 2.00x (met), peak allocated memory 0.40 (met)" in x for x in lines)
    assert any("qlora eager: tokens/s 1.20x (NOT met), peak allocated memory 0.70 (NOT met)" in x for x in lines)
    assert any("lora compiled: not compared (ours: not available: no compile field" in x for x in lines)
    assert lines[-1].startswith("1 section(s) skipped (serve), 1 row(s) skipped")


def test_rows_past_the_section_budget_are_skipped_with_the_reason(tmp_path):
    plan = gpu_run.Plan(shapes={}, seq=8, warmup=0, steps=1, compile_warmup=0, compile_backend="eager", gen={},
                        serve={}, matmul_n=8, budget_s=60, caps={"train": 1.0, "serve": 5.0}, min_row_s={"train": 0.3})
    run = gpu_run.Run(plan, tmp_path / "r.json", {"sections": {}})

    def slow(deadline):
        time.sleep(0.4)
        return {"tokens_per_s": 1.0, "side": "x"}

    run.section("train", [({"side": str(i)}, slow) for i in range(5)])
    run.section("serve", "not asked for")
    saved = json.loads((tmp_path / "r.json").read_text())["sections"]
    rows = saved["train"]["rows"]
    assert len(rows) == 5 and rows[0]["tokens_per_s"] == 1.0
    assert [r["side"] for r in rows if r.get("skipped")] == ["2", "3", "4"]
    assert "budget of 1 s was spent" in rows[-1]["skipped"]
    assert saved["serve"]["skipped"] == "not asked for"


def test_a_row_interrupted_by_the_budget_is_recorded():
    plan = gpu_run.Plan(shapes={}, seq=8, warmup=0, steps=1, compile_warmup=0, compile_backend="eager", gen={},
                        serve={}, matmul_n=8, budget_s=60, caps={"train": 0.5}, min_row_s={"train": 0.1})
    run = gpu_run.Run(plan, Path(os.devnull + ".d") / "r.json", {"sections": {}})
    run.save = lambda: None
    run.section("train", [({"side": "a"}, lambda d: time.sleep(5)), ({"side": "b"}, lambda d: {"ok": True})])
    rows = run.result["sections"]["train"]["rows"]
    assert rows[0]["skipped"].startswith("stopped at the section's budget") and rows[1]["skipped"]


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    for module in ("transformers", "peft", "bitsandbytes", "fastapi", "uvicorn", "httpx"):
        pytest.importorskip(module)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "benchmarks/gpu_run.py", "--dry-run", "--out-dir", str(out), "--cache",
                           str(tmp_path / "work"), "--budget", "200"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "cpu-dry-run.json").read_text())
    assert list(result["sections"]) == list(gpu_run.SECTIONS)
    for name, sec in result["sections"].items():
        assert sec.get("skipped") or sec["rows"], f"section {name} has neither rows nor a reason"
        for row in sec["rows"]:
            assert "error" not in row, f"{name}: {row}"
    parity = result["sections"]["parity"]["rows"]
    assert len(parity) == 7 and all(r["ok"] for r in parity)
    train = result["sections"]["train"]["rows"]
    assert len(train) == 8 and all(r["tokens_per_s"] > 0 and 0 < r["roofline_share"] for r in train)
    gen = result["sections"]["generate"]["rows"]
    assert {(r["side"], r["batch"]) for r in gen if r.get("tokens_per_s")} == {
        (s, b) for s in ("loratune", "transformers") for b in (1, 8)}
    serve = result["sections"]["serve"]["rows"]
    assert serve[0]["side"] == "loratune serve" and serve[0]["clients"] == 32 and serve[0]["tokens"] > 0
    assert len(result["sections"]["train_compile"]["rows"]) == 8  # measured, not available, or out of budget
    table = report_gpu.gpu_run_table(result)
    assert "DRY RUN" in table and table.count("| llama3.2-1b, lora, eager, 64 x 1 |") == 2
