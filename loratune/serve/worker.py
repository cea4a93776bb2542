"""The engine's thread: requests come in from the web server's event loop, tokens go back to it.

One thread runs :meth:`Engine.step` while there is work and sleeps otherwise. The event loop never
waits for it: submitting and cancelling only append to thread-safe queues that the thread drains
between steps, and changing adapters (which takes the step lock) runs in a helper thread
(``asyncio.to_thread``). Each request's tokens reach its event-loop queue as ``("token", id)``, then
one ``("done", reason)``; or ``("refused", message)`` when its adapter was unloaded before it reached the engine,
or ``("error", message)`` when a step failed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque

from .engine import AdapterNotLoaded, Engine, Request

log = logging.getLogger("loratune")


class QueueFull(Exception):
    """More requests wait than the server takes (HTTP 429)."""


class Worker:
    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine, self.max_queue = engine, max_queue
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: deque[tuple[Request, asyncio.AbstractEventLoop, asyncio.Queue]] = deque()
        self._cancels: deque[int] = deque()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self.generated = self.completed = 0  # tokens produced and requests finished since start (for /metrics)
        self._thread = threading.Thread(target=self._run, name="loratune-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Queue ``request`` (no waiting); its tokens arrive on the returned queue. QueueFull when full,
        ConfigError when it cannot fit the context."""
        waiting = len(self._incoming) + len(self.engine.waiting)
        if waiting >= self.max_queue:
            raise QueueFull(f"{waiting} requests are waiting; try again shortly")
        self.engine.check(request)
        queue: asyncio.Queue = asyncio.Queue()
        self._incoming.append((request, loop, queue))
        self._wake.set()
        return queue

    def cancel(self, request_id: int) -> None:
        """Free a request's slot at the next step boundary (its client went away; no waiting)."""
        self._cancels.append(request_id)
        self._wake.set()

    def in_flight(self) -> int:
        return len(self._streams) + len(self._incoming)

    def counts(self) -> dict[str, int]:
        """What /metrics shows (read without the lock: each number is a moment's, not a step's)."""
        e = self.engine
        return {"running": e.running(), "waiting": len(e.waiting) + (e.partial is not None) + len(self._incoming),
                "slots_free": e.free_slots(), "slots": e.max_batch, "streams": len(self._streams),
                "generated": self.generated, "completed": self.completed}

    def adapters_in_use(self) -> set[str]:
        """Adapters of requests not yet finished, those on their way to the engine included (call under lock)."""
        return self.engine.adapters_in_use() | {r.adapter for r, _, _ in list(self._incoming) if r.adapter}

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(timeout=0.05)
            try:
                with self.lock:
                    self._drain()
                    if not self.engine.busy():
                        self._wake.clear()
                        continue
                    produced, finished = self.engine.step()
                    items = [(request.id, ("token", token)) for request, token in produced]
                    items += [(f.request.id, ("done", f.reason)) for f in finished]
                    self._send(items)
                    self.generated += len(produced)
                    self.completed += len(finished)
                    for f in finished:
                        self._streams.pop(f.request.id, None)
            except Exception as exc:  # a bug or a bad adapter: every request in flight hears of it
                log.exception("engine step failed")
                with self.lock:
                    self._fail_all(f"{type(exc).__name__}: {exc}")

    def _drain(self) -> None:
        while self._incoming:
            request, loop, queue = self._incoming.popleft()
            self._streams[request.id] = (loop, queue)
            try:
                self.engine.submit(request)
            except AdapterNotLoaded as exc:  # its adapter was unloaded after the request was checked
                self._send([(request.id, ("refused", str(exc)))])
                self._streams.pop(request.id, None)
        while self._cancels:
            request_id = self._cancels.popleft()
            self.engine.cancel(request_id)
            self._streams.pop(request_id, None)

    def _send(self, items: list[tuple[int, tuple]]) -> None:
        """Hand (request id, item) pairs to their event loops: one wake-up per loop for a whole step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[int, asyncio.Queue, tuple]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((request_id, target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(queue, item) for _, queue, item in batch])
            except RuntimeError:  # its event loop is closed: nobody listens any more
                for request_id, _, _ in batch:
                    self._streams.pop(request_id, None)
                    self.engine.cancel(request_id)

    def _fail_all(self, message: str) -> None:
        self._send([(request_id, ("error", message)) for request_id in self._streams])
        for request_id in list(self._streams):
            self.engine.cancel(request_id)
        self._streams.clear()


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
