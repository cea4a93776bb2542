"""Mixed load on a running ``loratune serve``: concurrent clients over a mix of adapters and the base, streamed
and whole answers, clients that disconnect mid-answer, and adapters unloaded and loaded while requests run.

Every completed greedy answer is compared with its reference (what ``generate`` gives the prompt with that
adapter alone). Shared by tests/serve/test_soak.py (a bounded run in the suite) and benchmarks/serve_soak.py
(ten minutes); no pytest here. The run is bounded: clients stop starting requests at the deadline and every
request has the client's timeout.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SoakPlan:
    url: str
    base: str
    """The base model's name in the API."""
    prompts: list[str]
    references: dict[tuple[int, str], str]
    """(prompt index, model name) -> the expected greedy text of ``max_tokens`` tokens."""
    adapters: list[str]
    """Every adapter of --adapter-dir (each loaded by its name as the path); requests name any of them."""
    seconds: float
    clients: int = 8
    max_tokens: int = 16
    disconnect_share: float = 0.15
    churn_every_s: float = 2.0
    seed: int = 0
    timeout_s: float = 120.0


@dataclass
class SoakResult:
    outcomes: Counter = field(default_factory=Counter)
    churn: Counter = field(default_factory=Counter)
    wrong: list[dict] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


class Soak:
    def __init__(self, plan: SoakPlan) -> None:
        self.plan, self.result = plan, SoakResult()
        self.deadline = 0.0

    async def run(self) -> SoakResult:
        import httpx

        started = time.monotonic()
        self.deadline = started + self.plan.seconds
        async with httpx.AsyncClient(base_url=self.plan.url, timeout=self.plan.timeout_s) as client:
            await asyncio.gather(self._churn(client), *(self._client(client, random.Random(self.plan.seed * 1000 + i))
                                                        for i in range(self.plan.clients)))
        self.result.seconds = time.monotonic() - started
        return self.result

    async def _client(self, client, rng: random.Random) -> None:
        models = [self.plan.base, *self.plan.adapters]
        while time.monotonic() < self.deadline:
            index, model = rng.randrange(len(self.plan.prompts)), rng.choice(models)
            body = {"model": model, "prompt": self.plan.prompts[index], "max_tokens": self.plan.max_tokens,
                    "temperature": 0}
            try:
                if rng.random() < self.plan.disconnect_share:
                    await self._disconnect(client, body, rng.randrange(4))
                elif rng.random() < 0.5:
                    await self._streamed(client, body, index, model)
                else:
                    await self._whole(client, body, index, model)
            except Exception as exc:  # the server went away, or answered out of protocol
                self.result.outcomes[f"client error: {type(exc).__name__}"] += 1
                self.result.wrong.append({"model": model, "prompt": index, "error": repr(exc)[:300]})

    async def _whole(self, client, body: dict, index: int, model: str) -> None:
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            self._refused(r.status_code, r.text)
            return
        answer = r.json()
        self._check(index, model, answer["choices"][0]["text"], answer["usage"]["completion_tokens"], "whole")

    async def _streamed(self, client, body: dict, index: int, model: str) -> None:
        text, tokens = "", 0
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                self._refused(r.status_code, (await r.aread()).decode())
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    self._refused(chunk["error"].get("code", 500), json.dumps(chunk))
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"]:
                    text += chunk["choices"][0]["text"]
        self._check(index, model, text, tokens, "streamed")

    async def _disconnect(self, client, body: dict, after: int) -> None:
        """Start a streamed answer and hang up after ``after`` chunks (the connection is closed, not drained)."""
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                self._refused(r.status_code, (await r.aread()).decode())
                return
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen > after:
                    break
        self.result.outcomes["disconnected mid-answer" if seen > after else "answered before the hang-up"] += 1

    def _check(self, index: int, model: str, text: str, tokens: int, how: str) -> None:
        self.result.tokens += tokens
        expected = self.plan.references[(index, model)]
        if text == expected:
            self.result.outcomes["completed, equal to generate"] += 1
        else:
            self.result.outcomes["completed, DIFFERENT from generate"] += 1
            self.result.wrong.append({"model": model, "prompt": index, "how": how, "got": text, "expected": expected})

    def _refused(self, status: int, text: str) -> None:
        if status == 404 and ("not loaded" in text or "does not exist" in text):
            self.result.outcomes["404: adapter not loaded at that moment"] += 1
        elif status == 429:
            self.result.outcomes["429: queue full"] += 1
        else:
            self.result.outcomes[f"HTTP {status}"] += 1
            self.result.wrong.append({"status": status, "body": text[:300]})

    async def _churn(self, client) -> None:
        """Every few seconds unload a loaded adapter or load one that is not (a load past --max-adapters evicts
        the least recently used one not in use)."""
        rng = random.Random(self.plan.seed)
        while time.monotonic() < self.deadline:
            await asyncio.sleep(self.plan.churn_every_s)
            loaded = [m["id"] for m in (await client.get("/v1/models")).json()["data"] if m["id"] != self.plan.base]
            absent = [a for a in self.plan.adapters if a not in loaded]
            if absent and (not loaded or rng.random() < 0.7):  # mostly loads: most adapters stay served
                name = rng.choice(absent)
                r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
                self.result.churn[f"load: HTTP {r.status_code}{_why(r)}"] += 1
            elif loaded:
                r = await client.post("/v1/unload_lora_adapter", json={"lora_name": rng.choice(loaded)})
                self.result.churn[f"unload: HTTP {r.status_code}{_why(r)}"] += 1


def _why(response) -> str:
    """A refused load or unload's reason, in short."""
    if response.status_code == 200:
        return ""
    text = response.text
    if "places are in use" in text:
        return " (every place held by an adapter in use)"
    return f" ({text[:80]})"


def metrics(text: str) -> dict[str, float]:
    """/metrics' Prometheus text as {name: value}."""
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def settle(url: str, within_s: float = 60.0) -> dict[str, float]:
    """/metrics once the server at ``url`` is idle: nothing running, waiting or streaming (or after ``within_s``)."""
    import httpx

    deadline = time.monotonic() + within_s
    while True:
        m = metrics(httpx.get(f"{url}/metrics", timeout=30).text)
        idle = not (m["loratune_streams_open"] or m["loratune_requests_running"] or m["loratune_requests_waiting"])
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
