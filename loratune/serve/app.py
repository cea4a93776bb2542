"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions (both streamed by server-sent
events on request), models, health, and vLLM's adapter loading. The request's ``model`` field picks the
adapter (the base model's name: no adapter), as in vLLM.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import ConfigError, LoratuneError
from ..generate.chat import messages_prompt
from ..generate.sampling import SamplingConfig
from .adapters import AdapterRegistry
from .engine import Request
from .worker import QueueFull, Worker


@dataclass
class ServeConfig:
    """What ``loratune serve`` was started with (see cli/serve.py)."""

    model_name: str
    api_key: str | None = None
    max_prompt_tokens: int = 1024
    max_tokens: int = 512
    timeout_s: float = 300.0
    max_queue: int = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class OpenAIServer:
    """The handlers; :func:`create_app` routes them."""

    def __init__(self, worker: Worker, registry: AdapterRegistry, tokenizer, cfg: ServeConfig) -> None:
        self.worker, self.registry, self.tokenizer, self.cfg = worker, registry, tokenizer, cfg
        self.closing = False

    async def api_error(self, _, exc: APIError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
                            status_code=exc.status)

    async def guard(self, request: HTTPRequest, call_next):
        """Bearer-token auth on /v1/ when --api-key is set; 503 once shutting down."""
        if self.cfg.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {self.cfg.api_key}":
                return JSONResponse({"error": {"message": "missing or wrong API key (Authorization: Bearer ...)",
                                               "type": "authentication_error", "code": 401}}, status_code=401)
        if self.closing and request.url.path.startswith("/v1/"):
            return JSONResponse({"error": {"message": "the server is shutting down", "type": "unavailable",
                                           "code": 503}}, status_code=503)
        return await call_next(request)

    async def health(self):
        return JSONResponse({"status": "closing" if self.closing else "ok"}, status_code=503 if self.closing else 200)

    async def models(self):
        now, base = int(time.time()), self.cfg.model_name
        data = [{"id": base, "object": "model", "created": now, "owned_by": "loratune", "root": base, "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "loratune", "root": str(p), "parent": base}
                 for n, p in self.registry.loaded.items()]
        return {"object": "list", "data": data}

    async def load(self, body: dict):
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "give lora_name and lora_path (strings)")
        try:
            with self.worker.lock:
                evicted = self.registry.load(name, path, self.worker.engine.adapters_in_use())
                self.worker.engine.adapters_changed()
        except (LoratuneError, OSError) as exc:
            raise APIError(400, str(exc)) from None
        note = f" (evicted {', '.join(evicted)})" if evicted else ""
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully{note}.")

    async def unload(self, body: dict):
        name = body.get("lora_name")
        try:
            with self.worker.lock:
                self.registry.unload(name, self.worker.engine.adapters_in_use())
                self.worker.engine.adapters_changed()
        except KeyError:
            raise APIError(404, f"no adapter named {name!r} is loaded", "not_found_error") from None
        except LoratuneError as exc:
            raise APIError(409, str(exc)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def completions(self, body: dict, request: HTTPRequest):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string (or a list of one)")
        return await self._answer(body, request, self.tokenizer.encode(prompt), list(self.tokenizer.eos_ids), False)

    async def chat(self, body: dict, request: HTTPRequest):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects")
        try:
            ids, stops = messages_prompt(self.tokenizer, messages, **(body.get("chat_template_kwargs") or {}))
        except LoratuneError as exc:
            raise APIError(400, str(exc)) from None
        return await self._answer(body, request, ids, stops, True)

    async def _answer(self, body: dict, request: HTTPRequest, ids: list[int], stop_ids: list[int], chat: bool):
        adapter = self._adapter_of(body)
        sampling, n, stops = self._sampling(body, len(ids))
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
        except ConfigError as exc:
            raise APIError(400, str(exc)) from None
        if adapter:
            self.registry.touch(adapter)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.get("model") or self.cfg.model_name}
        if body.get("stream"):
            return StreamingResponse(self._stream(requests, queues, stops, meta, chat, len(ids), request),
                                     media_type="text/event-stream")
        outs = await asyncio.gather(*(self._collect(r, q, stops, request) for r, q in zip(requests, queues)))
        choices = [_choice(i, text, reason, chat, False) for i, (text, reason, _) in enumerate(outs)]
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(len(ids), sum(k for _, _, k in outs))}

    def _adapter_of(self, body: dict) -> str | None:
        name = body.get("model") or self.cfg.model_name
        if name == self.cfg.model_name:
            return None
        if name not in self.registry.loaded:
            raise APIError(404, f"the model {name!r} does not exist: the base is {self.cfg.model_name!r}, adapters: "
                                f"{', '.join(self.registry.loaded) or 'none'}", "not_found_error")
        return name

    def _sampling(self, body: dict, prompt_len: int) -> tuple[SamplingConfig, int, list[str]]:
        cfg = self.cfg
        if prompt_len > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server takes at most "
                                f"{cfg.max_prompt_tokens}")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        n, stop = body.get("n") or 1, body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= cfg.max_tokens:
            raise APIError(400, f"max_tokens must be an integer in [1, {cfg.max_tokens}], got {max_tokens!r}")
        if not isinstance(n, int) or not 1 <= n <= 8:
            raise APIError(400, f"n must be an integer in [1, 8], got {n!r}")
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings")
        try:
            sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=float(body.get("temperature", 1.0)),
                                      top_k=body.get("top_k") or None, top_p=body.get("top_p"), seed=body.get("seed"))
        except (LoratuneError, TypeError, ValueError) as exc:
            raise APIError(400, str(exc)) from None
        return sampling, n, stop

    async def _events(self, r: Request, queue: asyncio.Queue, request: HTTPRequest):
        """(token, None) as they come, then (None, finish reason); cancels on a disconnect or the timeout."""
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                late = time.monotonic() > deadline
                if late or await request.is_disconnected():
                    self.worker.cancel(r.id)
                    yield None, "timeout" if late else "cancelled"
                    return
                continue
            if kind == "error":
                raise APIError(500, value, "server_error")
            yield (value, None) if kind == "token" else (None, value)
            if kind == "done":
                return

    async def _texts(self, r: Request, queue: asyncio.Queue, stops: list[str], request: HTTPRequest):
        """(text so far, tokens, finish reason or None) after each token; the text is cut at a stop string."""
        tokens = []
        async for token, end in self._events(r, queue, request):
            if end is not None:
                if end == "timeout":
                    raise APIError(504, f"the request took longer than {self.cfg.timeout_s:g} s", "timeout_error")
                yield self.tokenizer.decode(tokens), tokens, end
                return
            tokens.append(token)
            text = self.tokenizer.decode(tokens)
            hit = _stop_at(text, stops)
            if hit is not None:
                self.worker.cancel(r.id)
                yield text[:hit], tokens, "stop"
                return
            yield text, tokens, None

    async def _collect(self, r: Request, queue: asyncio.Queue, stops: list[str], request: HTTPRequest):
        text, tokens, reason = "", [], None
        async for text, tokens, reason in self._texts(r, queue, stops, request):
            pass
        return text, reason, len(tokens)

    async def _stream(self, requests, queues, stops, meta, chat, prompt_len, request):
        obj = "chat.completion.chunk" if chat else "text_completion"
        total = 0
        for index, (r, q) in enumerate(zip(requests, queues)):
            if chat:
                yield _sse({**meta, "object": obj, "choices": [{"index": index, "finish_reason": None,
                                                                 "delta": {"role": "assistant", "content": ""}}]})
            sent, reason, count = "", None, 0
            async for text, tokens, reason in self._texts(r, q, stops, request):
                count = len(tokens)
                if reason or not text.endswith("\ufffd"):  # hold back a split multi-byte character
                    delta, sent = text[len(sent):], text
                    if delta:
                        yield _sse({**meta, "object": obj, "choices": [_choice(index, delta, None, chat, True)]})
            total += count
            yield _sse({**meta, "object": obj, "choices": [_choice(index, "", reason, chat, True)]})
        yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(prompt_len, total)})
        yield "data: [DONE]\n\n"


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI application of ``server``'s handlers."""
    app = FastAPI(title="loratune serve")
    app.add_exception_handler(APIError, server.api_error)
    app.middleware("http")(server.guard)
    app.get("/health")(server.health)
    app.get("/v1/models")(server.models)
    app.post("/v1/load_lora_adapter")(server.load)
    app.post("/v1/unload_lora_adapter")(server.unload)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)
    return app


def _nth(sampling: SamplingConfig, i: int) -> SamplingConfig:
    """The i-th of n choices: the same settings, the seed moved on by i (n different samples, reproducibly)."""
    if i == 0 or sampling.seed is None:
        return sampling
    return SamplingConfig(**{**sampling.__dict__, "seed": (sampling.seed + i) % 2**64})


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
