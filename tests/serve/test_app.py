"""loratune/serve (app, worker, adapters) and ``loratune serve``'s build, through real HTTP clients (httpx and
the ``openai`` package) against uvicorn on a free loopback port: greedy answers per adapter equal ``generate``
with that adapter alone, also with 16 requests over 4 adapters and the base in flight at once; streaming gives
the same text; chat through the model's template; 429 when the queue is full; 401 without the key; adapters
loaded only from --adapter-dir; a client that disconnects frees its slot."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from served import ADAPTERS, PROMPTS, Running, expected, make_files  # noqa: E402
from soak_client import metrics  # noqa: E402

from loratune.errors import ConfigError  # noqa: E402
from loratune.generate import SamplingConfig  # noqa: E402
from loratune.generate.engine import Request  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(files):
    running = Running(files)
    yield running
    running.close()


def test_sixteen_concurrent_requests_over_four_adapters_and_the_base(files, server):
    names = [None, *ADAPTERS]
    jobs = [(PROMPTS[i % 5], names[(i // 5 + 2 * i) % 5], 6 + i % 4) for i in range(16)]  # 16 different pairs

    async def ask(client, prompt, adapter, n):
        r = await client.post("/v1/completions", json={"model": adapter or "base", "prompt": prompt,
                                                         "max_tokens": n, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(ask(client, *job) for job in jobs))

    answers = asyncio.run(all_at_once())
    for (prompt, adapter, n), answer in zip(jobs, answers):
        assert answer["choices"][0]["text"] == expected(files, prompt, adapter, n), (prompt, adapter)
        assert answer["usage"]["completion_tokens"] <= n and answer["object"] == "text_completion"
    assert len({a["choices"][0]["text"] for a in answers}) >= 12  # the adapters change the answers


def test_the_openai_client_streaming_and_chat(files, server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="dora", prompt="the red cat", max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected(files, "the red cat", "dora", 12)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="dora", prompt="the red cat", max_tokens=12, temperature=0, stream=True))  # every chunk has a choice
    assert streamed == whole.choices[0].text
    chunks = list(client.completions.create(model="dora", prompt="the red cat", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base" and set(ids[1:]) == set(ADAPTERS)
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "where does the cat"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "where does the cat"}], max_tokens=8, temperature=0,
        stream=True) if c.choices]
    assert "".join(parts) == chat.choices[0].message.content


def test_limits_and_refusals(files, server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 10_000})
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "base", "prompt": "the cat " * 200})
        assert r.status_code == 400 and "takes at most" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                      "chat_template_kwargs": {"template": "/etc/passwd"}})
        assert r.status_code == 400 and "may not set" in r.json()["error"]["message"]
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "v1.2", "lora_path": "a"})
        assert r.status_code == 400 and "cannot be named" in r.json()["error"]["message"]
        for bad in ("../outside", "/etc", "a/../../x"):
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": bad})
            assert r.status_code == 400, bad
        link = files["adapters"] / "escape"
        if not link.exists():
            os.symlink(files["base"], link)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "escape"})
        assert r.status_code == 400 and "outside" in r.json()["error"]["message"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "qonly"}).status_code == 200
        assert "qonly" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "qonly", "lora_path": "qonly"})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": "qonly", "prompt": "the red cat", "max_tokens": 6,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected(files, "the red cat", "qonly", 6)


def test_a_full_queue_is_429_and_a_missing_key_is_401(files):
    running = Running(files, max_batch=1, max_queue=1, api_key="sekrit")
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            assert client.post("/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 401
            bad = {"authorization": "Bearer wrong"}
            assert client.post("/v1/completions", json={"prompt": "x"}, headers=bad).status_code == 401
            assert client.get("/health").status_code == 200  # no key needed

        async def burst():
            headers = {"authorization": "Bearer sekrit"}
            async with httpx.AsyncClient(base_url=running.url, timeout=120, headers=headers) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json={
                    "model": "base", "prompt": "the red cat", "max_tokens": 40, "temperature": 0}) for _ in range(6)))

        codes = [r.status_code for r in asyncio.run(burst())]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    finally:
        running.close()


def in_flight(worker) -> int:
    """Requests the worker still holds, from /metrics' numbers: streams it serves and requests waiting (one queued
    in the engine counts in both; only zero or not, and requests not yet drained, matter here)."""
    counts = worker.counts()
    return counts["streams"] + counts["waiting"]


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Each engine step takes 50 ms more: a 60-token answer takes seconds, so what frees its slot is observable."""
    engine = server.server.worker.engine
    step = engine.step

    def slow():
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(engine, "step", slow)
    return engine


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot_at_once(files, server, slow_steps, stream):
    engine = slow_steps
    body = {"model": "a", "prompt": "the red cat", "max_tokens": 60, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                next(r.iter_lines())  # the first chunk: the request is running
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=0.5)
    left = time.monotonic()
    while in_flight(server.server.worker) or engine.free_slots() != engine.max_batch:
        assert time.monotonic() - left < 1.5, "the disconnected request kept its slot (60 tokens take 3 s here)"
        time.sleep(0.05)


def test_the_timeout_is_kept_while_tokens_flow(files, server, slow_steps):
    server.server.cfg.timeout_s = 1.0
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            started = time.monotonic()
            r = client.post("/v1/completions", json={"model": "base", "prompt": "the red cat", "max_tokens": 60,
                                                     "temperature": 0})
            assert r.status_code == 504 and time.monotonic() - started < 2.5
            events = client.post("/v1/completions", json={"model": "base", "prompt": "the red cat", "max_tokens": 60,
                                                          "temperature": 0, "stream": True}).text
            assert '"code": 504' in events and events.rstrip().endswith("data: [DONE]")
    finally:
        server.server.cfg.timeout_s = 60.0


def test_an_adapter_unloaded_while_a_request_is_on_its_way(files, server):
    """A request checked against the loaded adapters waits in the worker's queue (the engine is held): unloading
    its adapter is refused as in use; removed regardless, only that request is refused (404), not the others."""
    worker, registry = server.server.worker, server.server.registry

    async def ask(client, model):
        return await client.post("/v1/completions", json={"model": model, "prompt": "the red cat", "max_tokens": 4,
                                                           "temperature": 0})

    async def held():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with worker.lock:  # the engine thread cannot take the requests in
                tasks = [asyncio.create_task(ask(client, m)) for m in ("b", "a")]
                while in_flight(worker) < 2:
                    await asyncio.sleep(0.01)
                with pytest.raises(ConfigError, match="in use"):
                    registry.unload("b", worker.adapters_in_use())
                registry.unload("b", set())  # as if the check had missed it
                worker.engine.adapters_changed()
            return await asyncio.gather(*tasks)

    try:
        refused, served = asyncio.run(held())
        assert refused.status_code == 404 and "'b' is not loaded" in refused.json()["error"]["message"]
        assert served.status_code == 200 and served.json()["choices"][0]["text"] == expected(files, "the red cat",
                                                                                              "a", 4)
    finally:
        with worker.lock:
            registry.load("b", files["adapters"] / "b", set())
            worker.engine.adapters_changed()


def test_unloading_an_adapter_in_use_waits_for_its_requests(files, server, slow_steps):
    """Unload while a request for the adapter runs: new requests for it are refused at once (404), the running
    one finishes with the right answer, and then the adapter is removed."""
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            running = asyncio.create_task(client.post("/v1/completions", json={
                "model": "a", "prompt": "the red cat", "max_tokens": 20, "temperature": 0}))
            while not server.server.worker.engine.running():
                await asyncio.sleep(0.01)
            unload = asyncio.create_task(client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}))
            while "a" not in server.server.registry.draining:
                await asyncio.sleep(0.01)
            late = await client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
            models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            return await running, await unload, late, models

    try:
        answer, unloaded, late, models = asyncio.run(scenario())
        assert late.status_code == 404 and "a" not in models
        assert answer.json()["choices"][0]["text"] == expected(files, "the red cat", "a", 20)
        assert unloaded.status_code == 200 and "a" not in server.server.registry.loaded
    finally:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"}).raise_for_status()


def test_a_request_cancelled_before_it_reaches_the_engine_never_runs(server):
    worker = server.server.worker
    generated = worker.generated
    with worker.lock:  # the engine's thread is held between two steps
        request = Request([1, 2, 3], None, SamplingConfig(max_new_tokens=5, temperature=0.0))
        worker.submit(request, asyncio.new_event_loop())
        worker.cancel(request.id)  # queued after the submit, drained with it
    time.sleep(0.3)
    assert worker.generated == generated and in_flight(worker) == 0 and not worker.engine.busy()


def test_a_pickled_adapter_is_refused_and_a_stopped_engine_is_unhealthy(files, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = files["adapters"] / "pickled"
    if not pickled.exists():
        shutil.copytree(files["adapters"] / "a", pickled)
        torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
        (pickled / "adapter_model.safetensors").unlink()
    running = Running(files)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "pickled", "lora_path": "pickled"})
            assert r.status_code == 400 and "safetensors only" in r.json()["error"]["message"]
            running.server.worker.stop()
            assert client.get("/health").status_code == 503
    finally:
        running.close()


def test_metrics_show_the_slots_and_the_tokens(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        client.post("/v1/completions", json={"model": "a", "prompt": "the red cat", "max_tokens": 5,
                                             "temperature": 0}).raise_for_status()
        text = client.get("/metrics").text
    values = metrics(text)
    assert values["loratune_kv_slots_free"] == values["loratune_kv_slots"] == 8
    assert values["loratune_requests_running"] == values["loratune_requests_waiting"] == 0
    assert values["loratune_generation_tokens_total"] >= 5 and values["loratune_adapters_loaded"] == len(ADAPTERS)
    assert "# TYPE loratune_requests_finished_total counter" in text


def test_stop_strings_are_never_half_sent():
    from loratune.serve.answers import held_back as _held_back, stop_at as _stop_at

    assert _held_back("the cat sa", ["sat down"]) == 2 and _held_back("the cat", ["dog"]) == 0
    assert _held_back("caf\ufffd", []) == 1 and _stop_at("a b STOP c", ["STOP", "b"]) == 2
