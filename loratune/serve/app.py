"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions (both streamed by server-sent
events on request), models, health, and vLLM's adapter loading. The request's ``model`` field picks the
adapter (the base model's name: no adapter), as in vLLM.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import ConfigError, LoratuneError
from ..generate.chat import messages_prompt
from ..generate.sampling import SamplingConfig
from .adapters import AdapterRegistry
from .engine import AdapterNotLoaded, Request
from .metrics import prometheus_text
from .worker import QueueFull, Worker


@dataclass
class ServeConfig:
    """What ``loratune serve`` was started with (see cli/serve.py)."""

    model_name: str
    context: int
    vocab: int
    api_key: str | None = None
    max_prompt_tokens: int = 1024
    max_tokens: int = 512
    timeout_s: float = 300.0


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class OpenAIServer:
    """The handlers; :func:`create_app` routes them."""

    def __init__(self, worker: Worker, registry: AdapterRegistry, tokenizer, cfg: ServeConfig) -> None:
        self.worker, self.registry, self.tokenizer, self.cfg = worker, registry, tokenizer, cfg

    async def api_error(self, _, exc: APIError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
                            status_code=exc.status)

    async def auth(self, request: HTTPRequest) -> None:
        """Bearer-token auth on /v1/ when --api-key is set (a dependency, not a middleware: Starlette's
        BaseHTTPMiddleware would hide a client's disconnect from the handlers)."""
        given = request.headers.get("authorization", "").encode()
        if self.cfg.api_key and not hmac.compare_digest(given, f"Bearer {self.cfg.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    async def health(self):
        if not self.worker.alive():
            return JSONResponse({"status": "the engine's thread has stopped"}, status_code=503)
        return {"status": "ok"}

    async def metrics(self):
        """The engine's state in Prometheus' text format (as vLLM's /metrics: no key needed, numbers only)."""
        return PlainTextResponse(prometheus_text(self.worker.counts(), len(self.registry.loaded)),
                                 media_type="text/plain; version=0.0.4")

    async def models(self):
        now, base = int(time.time()), self.cfg.model_name
        data = [{"id": base, "object": "model", "created": now, "owned_by": "loratune", "root": base, "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "loratune", "root": str(p), "parent": base}
                 for n, p in self.registry.serving().items()]
        return {"object": "list", "data": data}

    async def load(self, body: dict):
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "give lora_name and lora_path (strings)")

        def attach():  # on the engine's thread, between two steps
            return self.registry.attach(name, files, self.worker.adapters_in_use())

        try:
            files = await asyncio.to_thread(self.registry.read, name, path)  # the disk, off the engine's thread
            evicted = await self.worker.between_steps(attach)
        except (LoratuneError, OSError) as exc:
            raise APIError(400, str(exc)) from None
        note = f" (evicted {', '.join(evicted)})" if evicted else ""
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully{note}.")

    async def unload(self, body: dict):
        """Unload an adapter: new requests for it are refused (404) at once, and it is removed as soon as its
        requests in flight have finished (409 if they take longer than --timeout)."""
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise APIError(400, "give lora_name (a string)")
        if name not in self.registry.serving():
            raise APIError(404, f"no adapter named {name!r} is loaded", "not_found_error")

        def remove() -> bool:  # on the engine's thread, between two steps
            if name not in self.registry.loaded:  # removed meanwhile (a load evicted it): gone, as asked
                return True
            if name in self.worker.adapters_in_use():
                return False
            self.registry.unload(name, set())
            return True

        self.registry.draining.add(name)
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            while not await self.worker.between_steps(remove):
                if time.monotonic() > deadline:
                    raise APIError(409, f"adapter {name!r} is still in use by requests after {self.cfg.timeout_s:g} s; "
                                        "it stays loaded")
                await asyncio.sleep(0.05)
        finally:
            self.registry.draining.discard(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def completions(self, body: dict, request: HTTPRequest):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt  # token ids, as OpenAI's API allows
            if max(ids) >= self.cfg.vocab or min(ids) < 0:
                raise APIError(400, f"prompt token ids must be in [0, {self.cfg.vocab})")
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)")
        return await self._answer(body, request, ids, list(self.tokenizer.eos_ids), False)

    async def chat(self, body: dict, request: HTTPRequest):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects")
        variables = body.get("chat_template_kwargs") or {}
        if not isinstance(variables, dict) or not all(
                isinstance(k, str) and k.isidentifier() and k not in RESERVED and isinstance(v, (str, bool, int, float))
                for k, v in variables.items()):
            raise APIError(400, "chat_template_kwargs must map names to plain values (and may not set "
                                f"{', '.join(sorted(RESERVED))})")
        try:
            ids, stops = messages_prompt(self.tokenizer, [_plain(m) for m in messages], None, **variables)
        except LoratuneError as exc:
            raise APIError(400, str(exc)) from None
        return await self._answer(body, request, ids, stops, True)

    async def _answer(self, body: dict, request: HTTPRequest, ids: list[int], stop_ids: list[int], chat: bool):
        adapter = self._adapter_of(body)
        sampling, n, stops = self._sampling(body, len(ids), chat)
        loop = asyncio.get_running_loop()
        requests = [Request(ids, adapter, _nth(sampling, i), stop_ids) for i in range(n)]
        queues = []
        try:
            for r in requests:
                queues.append(self.worker.submit(r, loop))
        except QueueFull as exc:
            for r in requests[:len(queues)]:
                self.worker.cancel(r.id)
            raise APIError(429, str(exc), "rate_limit_error") from None
        except AdapterNotLoaded as exc:  # unloaded since _adapter_of looked
            raise APIError(404, str(exc), "not_found_error") from None
        except ConfigError as exc:
            raise APIError(400, str(exc)) from None
        if adapter:
            self.registry.touch(adapter)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.get("model") or self.cfg.model_name}
        deadline = time.monotonic() + self.cfg.timeout_s
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._stream(requests, queues, stops, meta, chat, len(ids) if usage else None,
                                                  request, deadline), media_type="text/event-stream")
        tasks = [asyncio.ensure_future(self._collect(r, q, stops, request, deadline)) for r, q in zip(requests, queues)]
        try:
            outs = await asyncio.gather(*tasks)
        finally:  # one choice failed or the client left: its siblings stop too
            for task in tasks:
                task.cancel()
            for r in requests:
                self.worker.cancel(r.id)
        choices = [_choice(i, text, reason, chat, False) for i, (text, reason, _) in enumerate(outs)]
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(len(ids), sum(k for _, _, k in outs))}

    def _adapter_of(self, body: dict) -> str | None:
        name = body.get("model") or self.cfg.model_name
        if name == self.cfg.model_name:
            return None
        if name not in self.registry.serving():
            raise APIError(404, f"the model {name!r} does not exist: the base is {self.cfg.model_name!r}, adapters: "
                                f"{', '.join(self.registry.serving()) or 'none'}", "not_found_error")
        return name

    def _sampling(self, body: dict, prompt_len: int, chat: bool) -> tuple[SamplingConfig, int, list[str]]:
        cfg = self.cfg
        if prompt_len > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server takes at most "
                                f"{cfg.max_prompt_tokens}")
        max_tokens = _given(body, "max_completion_tokens", _given(body, "max_tokens", None))
        if max_tokens is None:  # OpenAI's defaults: 16 for completions; chat runs until it ends (here: our limits)
            max_tokens = min(cfg.max_tokens, cfg.context - prompt_len) if chat else 16
        n, stop = _given(body, "n", 1), _given(body, "stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= cfg.max_tokens:
            raise APIError(400, f"max_tokens must be an integer in [1, {cfg.max_tokens}], got {max_tokens!r}")
        if not isinstance(n, int) or not 1 <= n <= 8:
            raise APIError(400, f"n must be an integer in [1, 8], got {n!r}")
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings")
        try:
            top_k = _given(body, "top_k", None)
            sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=float(_given(body, "temperature", 1.0)),
                                      top_k=None if top_k in (-1, 0) else top_k, top_p=_given(body, "top_p", None),
                                      seed=_given(body, "seed", None))
        except (LoratuneError, TypeError, ValueError) as exc:
            raise APIError(400, str(exc)) from None
        return sampling, n, stop

    async def _events(self, r: Request, queue: asyncio.Queue, request: HTTPRequest, deadline: float):
        """(token, None) as they come, then (None, finish reason). The client's connection is looked at every
        0.2 s whether tokens flow or not; on a disconnect, the timeout or any exit the request is
        cancelled (freeing its slot)."""
        checked = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now > deadline:
                    raise APIError(504, f"the request took longer than {self.cfg.timeout_s:g} s", "timeout_error")
                if now - checked > 0.2:
                    checked = now
                    if await request.is_disconnected():
                        return
                try:
                    kind, value = await asyncio.wait_for(queue.get(), timeout=min(0.5, max(deadline - now, 0.01)))
                except asyncio.TimeoutError:
                    continue
                if kind == "error":
                    raise APIError(500, value, "server_error")
                if kind == "refused":
                    raise APIError(404, value, "not_found_error")
                yield (value, None) if kind == "token" else (None, value)
                if kind == "done":
                    return
        finally:
            self.worker.cancel(r.id)

    async def _texts(self, r: Request, queue: asyncio.Queue, stops: list[str], request: HTTPRequest,
                     deadline: float):
        """(text so far, tokens, finish reason or None) after each token; the text is cut at a stop string."""
        tokens = []
        async for token, end in self._events(r, queue, request, deadline):
            if end is not None:
                yield self.tokenizer.decode(tokens), tokens, end
                return
            tokens.append(token)
            text = self.tokenizer.decode(tokens)
            hit = _stop_at(text, stops)
            if hit is not None:
                yield text[:hit], tokens, "stop"
                return
            yield text, tokens, None

    async def _collect(self, r: Request, queue: asyncio.Queue, stops: list[str], request: HTTPRequest,
                       deadline: float):
        text, tokens, reason = "", [], None
        async for text, tokens, reason in self._texts(r, queue, stops, request, deadline):
            pass
        return text, reason, len(tokens)

    async def _stream(self, requests, queues, stops, meta, chat, prompt_len, request, deadline):
        """Server-sent events: the choices one after another, each as text deltas. A stop string's possible
        beginning is held back until it is known not to be one; an error mid-stream is an ``error`` event."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        total = 0
        try:
            for index, (r, q) in enumerate(zip(requests, queues)):
                if chat:
                    yield _sse({**meta, "object": obj, "choices": [{"index": index, "finish_reason": None,
                                                                     "delta": {"role": "assistant", "content": ""}}]})
                sent, reason, count = 0, None, 0
                async for text, tokens, reason in self._texts(r, q, stops, request, deadline):
                    count = len(tokens)
                    safe = len(text) if reason else len(text) - _held_back(text, stops)
                    if safe > sent:
                        yield _sse({**meta, "object": obj, "choices": [_choice(index, text[sent:safe], None, chat,
                                                                               True)]})
                        sent = safe
                total += count
                yield _sse({**meta, "object": obj, "choices": [_choice(index, "", reason, chat, True)]})
        except APIError as exc:
            yield _sse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})
        finally:
            for r in requests:
                self.worker.cancel(r.id)
        if prompt_len is not None:  # stream_options.include_usage
            yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(prompt_len, total)})
        yield "data: [DONE]\n\n"


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI application of ``server``'s handlers."""
    app = FastAPI(title="loratune serve")
    app.add_exception_handler(APIError, server.api_error)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    keyed = {"dependencies": [Depends(server.auth)]}
    app.get("/v1/models", **keyed)(server.models)
    app.post("/v1/load_lora_adapter", **keyed)(server.load)
    app.post("/v1/unload_lora_adapter", **keyed)(server.unload)
    app.post("/v1/completions", **keyed)(server.completions)
    app.post("/v1/chat/completions", **keyed)(server.chat)
    return app


def _nth(sampling: SamplingConfig, i: int) -> SamplingConfig:
    """The i-th of n choices: the same settings, the seed moved on by i (n different samples, reproducibly)."""
    if i == 0 or sampling.seed is None:
        return sampling
    return SamplingConfig(**{**sampling.__dict__, "seed": (sampling.seed + i) % 2**64})


RESERVED = frozenset({"messages", "template", "tokenizer", "add_generation_prompt"})
"""chat_template_kwargs that may not be set: they would reach other parameters (a template path on disk)."""


def _given(body: dict, key: str, default):
    """``body[key]`` unless absent or null (0 and "" are values, not absences)."""
    value = body.get(key)
    return default if value is None else value


def _plain(message: dict) -> dict:
    """A message whose content is a list of parts (OpenAI's format) with its text parts joined."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content):
            raise APIError(400, "only text content parts are supported")
        return {**message, "content": "".join(texts)}
    return message


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (or are a split character)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def _stop_at(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def _choice(index: int, text: str, reason: str | None, chat: bool, delta: bool) -> dict[str, Any]:
    if chat:
        key = "delta" if delta else "message"
        body = {"content": text} if delta else {"role": "assistant", "content": text}
        return {"index": index, key: body, "finish_reason": reason}
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
