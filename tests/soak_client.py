"""Mixed load on a running ``loratune serve``: concurrent clients over a mix of adapters and the base, streamed
and whole answers, clients that disconnect mid-answer, adapters unloaded and loaded while requests run, and (a
share of the requests) hostile ones: bad types, huge prompts and bodies, bad roles, lone surrogates, fields the
server refuses, and logit_bias at its extremes.

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
    hostile_share: float = 0.0
    """Share of requests taken from :data:`HOSTILE` (each must be refused with a 4xx, or answered as listed)."""


HOSTILE = [  # (what, path, JSON body or raw bytes, the statuses it may get)
    ("top_k 2.5", "/v1/completions", {"prompt": "the cat", "top_k": 2.5, "temperature": 1}, {400}),
    ("top_k true", "/v1/completions", {"prompt": "the cat", "top_k": True, "temperature": 1}, {400}),
    ("temperature a string", "/v1/completions", {"prompt": "the cat", "temperature": "hot"}, {400}),
    ("model a list", "/v1/completions", {"model": ["x"], "prompt": "the cat"}, {400}),
    ("stream_options a string", "/v1/completions", {"prompt": "the cat", "stream": True, "stream_options": "x"},
     {400}),
    ("an unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, {400}),
    ("a role that is an object", "/v1/chat/completions", {"messages": [{"role": {"a": 1}, "content": "hi"}]}, {400}),
    ("a text part without text", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, {400}),
    ("a lone surrogate", "/v1/completions", b'{"prompt": "\\ud800 cat"}', {400}),
    ("a prompt of 300,000 characters", "/v1/completions", {"prompt": "the cat " * 37_500}, {400}),
    ("a body of 3 MB", "/v1/completions", {"prompt": "x" * 3 * 2**20}, {413}),
    ("echo", "/v1/completions", {"prompt": "the cat", "echo": True}, {400}),
    ("best_of 3", "/v1/completions", {"prompt": "the cat", "best_of": 3}, {400}),
    ("logit_bias 1000", "/v1/completions", {"prompt": "the cat", "logit_bias": {"3": 1000}}, {400}),
    ("logit_bias +100", "/v1/completions", {"prompt": "the cat", "logit_bias": {"3": 100}, "max_tokens": 4,
                                            "temperature": 0}, {200}),
    ("logit_bias -100 on 200 tokens", "/v1/completions",
     {"prompt": "the cat", "logit_bias": {str(i): -100 for i in range(200)}, "max_tokens": 4, "logprobs": 5,
      "temperature": 1, "seed": 1, "presence_penalty": 2, "frequency_penalty": -2}, {200}),
    ("a NUL byte in lora_path", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a\x00b"}, {400}),
]
"""Requests no client should be able to harm another with (tests/serve/test_bad_requests.py has the full table)."""


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
                if rng.random() < self.plan.hostile_share:
                    await self._hostile(client, rng.choice(HOSTILE))
                elif rng.random() < self.plan.disconnect_share:
                    await self._disconnect(client, body, rng.randrange(4))
                elif rng.random() < 0.5:
                    await self._streamed(client, body, index, model)
                else:
                    await self._whole(client, body, index, model)
            except Exception as exc:  # the server went away, or answered out of protocol
                self.result.outcomes[f"client error: {type(exc).__name__}"] += 1
                self.result.wrong.append({"model": model, "prompt": index, "error": repr(exc)[:300]})

    async def _hostile(self, client, case: tuple) -> None:
        what, path, body, allowed = case
        import httpx

        try:
            if isinstance(body, bytes):
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                model = {} if "lora_name" in body else {"model": self.plan.base}  # the body's own model wins
                r = await client.post(path, json={**model, **body})
        except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
            if 413 not in allowed:
                raise
            self.result.outcomes["hostile, closed while sending a body past the limit"] += 1  # refused unread
            return
        line = r.json().get("error", {}).get("message", "") if r.status_code >= 400 else ""
        if r.status_code in allowed and "\n" not in line and "Traceback" not in line:
            self.result.outcomes[f"hostile, HTTP {r.status_code} as due"] += 1
        else:
            self.result.outcomes[f"hostile, HTTP {r.status_code} NOT as due"] += 1
            self.result.wrong.append({"hostile": what, "status": r.status_code, "body": r.text[:300]})

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
