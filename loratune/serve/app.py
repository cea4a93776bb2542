"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions (both streamed by server-sent
events on request), models, health, and vLLM's adapter loading. The request's ``model`` field picks the
adapter (the base model's name: no adapter), as in vLLM.

No request can hold up another: a body past --max-body-bytes is refused (413) before it is read, a prompt is
checked by its length in characters before it is tokenized, and tokenizing and chat-template rendering (the
model's template is untrusted code) run in threads of their own, never on the event loop or the engine's
thread. Every field is checked in :mod:`.params` before the request reaches the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import ConfigError, LoratuneError
from ..generate.chat import messages_prompt
from ..generate.sampling import SamplingConfig
from . import answers
from . import params as checks
from .adapters import AdapterRegistry
from .detokenize import AnswerText
from ..generate.engine import AdapterNotLoaded, Request
from .metrics import prometheus_text
from .params import BadRequest, Params
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
    max_body_bytes: int | None = None
    """Request bodies past this are refused (413) unread; None: :func:`default_body_limit`."""

    def __post_init__(self) -> None:
        self.max_body_bytes = self.max_body_bytes or checks.default_body_limit(self.max_prompt_tokens)

    @property
    def max_prompt_chars(self) -> int:
        return checks.CHARS_PER_TOKEN * self.max_prompt_tokens


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class OpenAIServer:
    """The handlers; :func:`create_app` routes them."""

    def __init__(self, worker: Worker, registry: AdapterRegistry, tokenizer, cfg: ServeConfig) -> None:
        self.worker, self.registry, self.tokenizer, self.cfg = worker, registry, tokenizer, cfg
        # tokenizing and template rendering: threads of their own, so that a slow one (a hostile template runs
        # until the renderer's bounds stop it) holds neither the event loop nor the default pool (adapter reads)
        self.prompts = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="loratune-prompt")

    async def api_error(self, _, exc: APIError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
                            status_code=exc.status)

    async def bad_request(self, _, exc: BadRequest):
        kind = "request_too_large" if exc.status == 413 else "invalid_request_error"
        return JSONResponse({"error": {"message": exc.message, "type": kind, "code": exc.status}},
                            status_code=exc.status)

    async def _json(self, request: HTTPRequest) -> dict:
        return await checks.read_body(request, self.cfg.max_body_bytes, self._off_loop)

    async def _off_loop(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in the prompt threads (never on the event loop), within the request timeout."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.prompts, lambda: fn(*args, **kwargs))
        try:
            return await asyncio.wait_for(future, timeout=self.cfg.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"preparing the prompt took longer than {self.cfg.timeout_s:g} s",
                           "timeout_error") from None

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

    async def load(self, request: HTTPRequest):
        body = await self._json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "give lora_name and lora_path (strings)")
        if "\0" in path or len(path) > 4096:
            raise APIError(400, "lora_path must be a directory path (no NUL character, at most 4096 characters)")

        def attach():  # on the engine's thread, between two steps
            return self.registry.attach(name, files, self.worker.adapters_in_use())

        try:
            files = await asyncio.to_thread(self.registry.read, name, path)  # the disk, off the engine's thread
            evicted = await self.worker.between_steps(attach)
        except (LoratuneError, OSError, ValueError) as exc:
            raise APIError(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        note = f" (evicted {', '.join(evicted)})" if evicted else ""
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully{note}.")

    async def unload(self, request: HTTPRequest):
        """Unload an adapter: new requests for it are refused (404) at once, and it is removed as soon as its
        requests in flight have finished (409 if they take longer than --timeout)."""
        body = await self._json(request)
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

    async def completions(self, request: HTTPRequest):
        body = await self._json(request)
        checks.check_unsupported(body, False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt  # token ids, as OpenAI's API allows
            if max(ids) >= self.cfg.vocab or min(ids) < 0:
                raise APIError(400, f"prompt token ids must be in [0, {self.cfg.vocab})")
        elif isinstance(prompt, str):
            self._check_chars(len(prompt))
            ids = await self._off_loop(self.tokenizer.encode, prompt)
        else:
            raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)")
        return await self._answer(body, request, ids, list(self.tokenizer.eos_ids), False)

    async def chat(self, request: HTTPRequest):
        body = await self._json(request)
        checks.check_unsupported(body, True)
        messages = checks.messages(body)
        variables = checks.chat_variables(body)
        self._check_chars(sum(len(m["content"]) for m in messages))
        try:  # the model's template is untrusted code: off the event loop, its failures are this request's
            ids, stops = await self._off_loop(messages_prompt, self.tokenizer, messages, None, **variables)
        except LoratuneError as exc:
            raise APIError(400, str(exc)) from None
        except (RecursionError, MemoryError, OverflowError, TypeError, ValueError) as exc:
            raise APIError(400, f"the model's chat template failed on this conversation: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from None
        return await self._answer(body, request, ids, stops, True)

    def _check_chars(self, chars: int) -> None:
        if chars > self.cfg.max_prompt_chars:
            raise APIError(400, f"the prompt has {chars:,} characters; this server takes at most "
                                f"{self.cfg.max_prompt_tokens} tokens, so at most {self.cfg.max_prompt_chars:,} "
                                "characters")

    async def _answer(self, body: dict, request: HTTPRequest, ids: list[int], stop_ids: list[int], chat: bool):
        adapter = self._adapter_of(body)
        p = self._params(body, len(ids), chat)
        loop = asyncio.get_running_loop()
        requests = [Request(ids, adapter, _nth(p.sampling, i), stop_ids, p.processing, p.logprobs)
                    for i in range(p.n)]
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
        stops = p.stops
        if p.stream:
            return StreamingResponse(self._stream(requests, queues, stops, meta, chat,
                                                  len(ids) if p.include_usage else None, request, deadline),
                                     media_type="text/event-stream")
        tasks = [asyncio.ensure_future(self._collect(r, q, stops, request, deadline)) for r, q in zip(requests, queues)]
        try:
            outs = await asyncio.gather(*tasks)
        finally:  # one choice failed or the client left: its siblings stop too
            for task in tasks:
                task.cancel()
            for r in requests:
                self.worker.cancel(r.id)
        choices = [answers.choice(i, text, reason, chat, False, self._logprobs(r, tokens, infos, chat))
                   for i, (r, (text, reason, tokens, infos)) in enumerate(zip(requests, outs))]
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": answers.usage(len(ids), sum(len(tokens) for _, _, tokens, _ in outs))}

    def _logprobs(self, r: Request, tokens: list[int], infos: list, chat: bool, offset: int = 0) -> dict | None:
        if r.logprobs is None:
            return None
        if chat:
            return answers.chat_logprobs(self.tokenizer, tokens, infos)
        return answers.completion_logprobs(self.tokenizer, tokens, infos, offset)

    def _adapter_of(self, body: dict) -> str | None:
        name = checks.model_name(body, self.cfg.model_name)
        if name == self.cfg.model_name:
            return None
        if name not in self.registry.serving():
            raise APIError(404, f"the model {name!r} does not exist: the base is {self.cfg.model_name!r}, adapters: "
                                f"{', '.join(self.registry.serving()) or 'none'}", "not_found_error")
        return name

    def _params(self, body: dict, prompt_len: int, chat: bool) -> Params:
        cfg = self.cfg
        if prompt_len > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server takes at most "
                                f"{cfg.max_prompt_tokens}")
        return checks.params(body, prompt_len, chat, cfg.max_tokens, cfg.context, cfg.vocab)

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
        """(the answer's text, its tokens, their logprobs, finish reason or None) after each token. The text
        (:class:`~.detokenize.AnswerText`, the same object each time) decodes only the new tokens, and is cut at a
        stop string."""
        text, infos = AnswerText(self.tokenizer, stops), []
        async for item, end in self._events(r, queue, request, deadline):
            if end is not None:
                text.finish()
                yield text, text.tokens, infos, "stop" if text.stopped else end
                return
            infos.append(item[1])
            text.add(item[0])
            yield text, text.tokens, infos, "stop" if text.stopped else None
            if text.stopped:
                return

    async def _collect(self, r: Request, queue: asyncio.Queue, stops: list[str], request: HTTPRequest,
                       deadline: float):
        text, tokens, infos, reason = None, [], [], None
        async for text, tokens, infos, reason in self._texts(r, queue, stops, request, deadline):
            pass
        return ("" if text is None else text.text), reason, tokens, infos

    async def _stream(self, requests, queues, stops, meta, chat, prompt_len, request, deadline):
        """Server-sent events: the choices one after another, each as text deltas. A stop string's possible
        beginning is held back until it is known not to be one; an error mid-stream is an ``error`` event."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        total = 0
        try:
            for index, (r, q) in enumerate(zip(requests, queues)):
                if chat:
                    yield answers.sse({**meta, "object": obj, "choices": [{"index": index, "finish_reason": None,
                                                                     "delta": {"role": "assistant", "content": ""}}]})
                sent, reason, count, told = 0, None, 0, 0  # characters sent, tokens, tokens whose logprobs went
                tokens, infos = [], []
                async for text, tokens, infos, reason in self._texts(r, q, stops, request, deadline):
                    count = len(tokens)
                    piece = text.take(final=reason is not None)
                    if piece:
                        logprobs = self._logprobs(r, tokens[told:], infos[told:], chat, sent)
                        yield answers.sse({**meta, "object": obj, "choices": [answers.choice(index, piece, None, chat,
                                                                               True, logprobs)]})
                        sent, told = sent + len(piece), len(tokens)
                total += count
                last = self._logprobs(r, tokens[told:], infos[told:], chat, sent) if len(tokens) > told else None
                yield answers.sse({**meta, "object": obj, "choices": [answers.choice(index, "", reason, chat, True, last)]})
        except APIError as exc:
            yield answers.sse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})
        finally:
            for r in requests:
                self.worker.cancel(r.id)
        if prompt_len is not None:  # stream_options.include_usage
            yield answers.sse({**meta, "object": obj, "choices": [], "usage": answers.usage(prompt_len, total)})
        yield "data: [DONE]\n\n"


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI application of ``server``'s handlers."""
    app = FastAPI(title="loratune serve")
    app.add_exception_handler(APIError, server.api_error)
    app.add_exception_handler(BadRequest, server.bad_request)
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
