"""A bounded soak of ``loratune serve`` (tests/soak_client.py; benchmarks/serve_soak.py runs it for ten
minutes): concurrent clients over four adapters and the base, random disconnects, adapters unloaded and loaded
while requests run (three places for four adapters, so loads evict), and a quarter of the requests hostile (bad
types, huge prompts and bodies, bad roles, lone surrogates, refused fields, logit_bias at its extremes: each
refused with its 4xx or answered); every completed answer equals ``generate`` alone, no request fails for
another reason, and afterwards every KV slot is free."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from served import ADAPTERS, PROMPTS, Running, expected, make_files  # noqa: E402
from soak_client import Soak, SoakPlan, settle  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
MAX_TOKENS = 8


@pytest.mark.slow
def test_mixed_load_with_disconnects_and_adapter_churn(tmp_path):
    files = make_files(tmp_path)
    references = {(i, name or "base"): expected(files, p, name, MAX_TOKENS)
                  for i, p in enumerate(PROMPTS) for name in [None, *ADAPTERS]}
    running = Running(files, max_batch=4, max_adapters=3, prefill_tokens=8,
                      adapter=[f"{n}={files['adapters'] / n}" for n in list(ADAPTERS)[:3]])
    try:
        plan = SoakPlan(running.url, "base", PROMPTS, references, list(ADAPTERS), seconds=12, clients=6,
                        max_tokens=MAX_TOKENS, disconnect_share=0.2, churn_every_s=0.5, hostile_share=0.25)
        result = asyncio.run(Soak(plan).run())
        m = settle(running.url, within_s=10)
    finally:
        running.close()
    out = result.outcomes
    print(dict(out), dict(result.churn))  # with -s: what RELIABILITY.md quotes
    assert not result.wrong, result.wrong[:3]  # no different answer, no unexpected status, no client error
    assert out["completed, equal to generate"] >= 30 and out["disconnected mid-answer"] >= 3, out
    assert sum(v for k, v in out.items() if k.startswith("hostile")) >= 10, out  # each as due (else in wrong)
    assert result.churn["load: HTTP 200"] >= 2 and result.churn["unload: HTTP 200"] >= 2, result.churn
    assert not (m["loratune_streams_open"] or m["loratune_requests_running"] or m["loratune_requests_waiting"]), m
    assert m["loratune_kv_slots_free"] == 4 and m["loratune_requests_finished_total"] >= 30
