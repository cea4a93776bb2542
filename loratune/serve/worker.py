"""The engine's thread: requests come in from the web server's event loop, tokens go back to it.

One thread runs :meth:`Engine.step` while there is work and sleeps otherwise. Submitting, cancelling
and changing adapters take the same lock as a step, so they happen between steps. Each request's
tokens reach its event-loop queue as ``("token", id)``, then one ``("done", reason)``, or
``("error", message)`` when a step failed.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from .engine import Engine, Request

log = logging.getLogger("loratune")


class QueueFull(Exception):
    """More requests wait than the server takes (HTTP 429)."""


class Worker:
    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine, self.max_queue = engine, max_queue
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loratune-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Queue ``request``; its tokens arrive on the returned queue. QueueFull when the queue is full."""
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            if len(self.engine.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.engine.waiting)} requests are waiting; try again shortly")
            self.engine.submit(request)  # ConfigError: too long
            self._streams[request.id] = (loop, queue)
        self._wake.set()
        return queue

    def cancel(self, request_id: int) -> None:
        """Free a request's slot (its client went away)."""
        with self.lock:
            self.engine.cancel(request_id)
            self._streams.pop(request_id, None)

    def in_flight(self) -> int:
        with self.lock:
            return len(self._streams)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(timeout=0.05)
            with self.lock:
                if not self.engine.busy():
                    self._wake.clear()
                    continue
                try:
                    produced, finished = self.engine.step()
                except Exception as exc:  # a bug or a bad adapter: every request in flight hears of it
                    log.exception("engine step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                    continue
                for request, token in produced:
                    self._send(request.id, ("token", token))
                for f in finished:
                    self._send(f.request.id, ("done", f.reason))
                    self._streams.pop(f.request.id, None)

    def _send(self, request_id: int, item: tuple) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, message: str) -> None:
        for request_id in list(self._streams):
            self._send(request_id, ("error", message))
            self.engine.cancel(request_id)
        self._streams.clear()
