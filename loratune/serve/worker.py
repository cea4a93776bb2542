"""The engine's thread: requests come in from the web server's event loop, tokens go back to it.

One thread runs :meth:`Engine.step` while there is work and sleeps otherwise. The event loop never
waits for it: submitting, cancelling and changing adapters only append to thread-safe queues that the
thread drains between steps (adapter changes first, as jobs whose results the event loop awaits; their
files are read before, outside the engine's thread). Each request's tokens reach its event-loop queue
as ``("token", (id, logprobs or None))``, then one ``("done", reason)``; or ``("refused", message)`` when
its adapter was unloaded before it reached the engine, or ``("error", message)`` when its row or a whole step
failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..generate.engine import AdapterNotLoaded, Engine, Request

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
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self.generated = self.completed = 0  # tokens produced and requests finished since start (for /metrics)
        self._thread: threading.Thread | None = None  # the thread running the engine, once it runs

    def start(self) -> None:
        """Run the engine in a thread of its own (see :meth:`run_until` for the caller's thread)."""
        self._thread = threading.Thread(target=self.run_until, name="loratune-engine", daemon=True)
        self._thread.start()

    def run_until(self, done: Callable[[], bool] = lambda: False) -> None:
        """Run the engine in this thread until :meth:`stop` or ``done()`` (looked at between steps, and every
        50 ms when idle). ``loratune serve`` runs it in the main thread, the one that loaded the model: with the
        engine in a second thread, benchmarks/serve_load.py decoded fewer tokens per second one request at a
        time than in the main thread (GPT-2 124M on CPU)."""
        self._thread = self._thread or threading.current_thread()
        while not self._stopping and not done():
            self._once()

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

    def counts(self) -> dict[str, int]:
        """What /metrics shows (read without the lock: each number is a moment's, not a step's)."""
        e = self.engine
        return {"running": e.running(), "waiting": len(e.waiting) + (e.partial is not None) + len(self._incoming),
                "slots_free": e.free_slots(), "slots": e.max_batch, "streams": len(self._streams),
                "generated": self.generated, "completed": self.completed}

    def adapters_in_use(self) -> set[str]:
        """Adapters of requests not yet finished, those on their way to the engine included (call under lock)."""
        return self.engine.adapters_in_use() | {r.adapter for r, _, _ in list(self._incoming) if r.adapter}

    def between_steps(self, job: Callable[[], Any]) -> asyncio.Future:
        """Run ``job`` on the engine's thread between two steps (loading or removing adapters: nothing else
        touches the model then; the engine then looks at its banks again); await the result. Jobs go first at the next step boundary, so a busy engine
        cannot keep them waiting."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.append((job, done))
        self._wake.set()
        return asyncio.wrap_future(done)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        while self._jobs:
            self._jobs.popleft()[1].cancel()

    def _once(self) -> None:
        """One step of work, or a short wait for some."""
        busy = False
        try:
            with self.lock:
                self._wake.clear()  # before draining: a request queued after this point wakes the next wait
                self._drain()
                busy = self.engine.busy()
                if busy:
                    self._step()
        except Exception as exc:  # a bug, or the device failed: every request in flight hears of it
            log.exception("engine step failed")
            try:
                with self.lock:
                    self._fail_all(f"{type(exc).__name__}: {exc}")
            except Exception:  # the engine's state is beyond repair: start it over, the thread lives on
                log.exception("could not fail the requests in flight one by one")
                self.engine.clear()
                self._streams.clear()
        if not busy:
            self._wake.wait(timeout=0.05)


    def _step(self) -> None:
        produced, finished = self.engine.step()
        items = [(request.id, ("token", (token, logprob))) for request, token, logprob in produced]
        items += [(f.request.id, ("error", f.error) if f.reason == "error" else ("done", f.reason))
                  for f in finished]
        self._send(items)
        self.generated += len(produced)
        self.completed += sum(f.reason != "error" for f in finished)
        for f in finished:
            self._streams.pop(f.request.id, None)

    def _drain(self) -> None:
        while self._jobs:
            job, done = self._jobs.popleft()
            if done.set_running_or_notify_cancel():
                try:
                    result, failure = job(), None
                except Exception as exc:  # the job's own failure (a bad adapter): its caller hears of it
                    result, failure = None, exc
                # the job changed adapters: the engine looks at its banks again before the caller hears back
                # (a request sent on the answer must find the adapter)
                self.engine.adapters_changed()
                if failure is None:
                    done.set_result(result)
                else:
                    done.set_exception(failure)
        cancelled = set()
        while self._cancels:
            cancelled.add(self._cancels.popleft())
        while self._incoming:
            request, loop, queue = self._incoming.popleft()
            if request.id in cancelled:  # its client left before it reached the engine
                continue
            self._streams[request.id] = (loop, queue)
            try:
                self.engine.submit(request)
            except AdapterNotLoaded as exc:  # its adapter was unloaded after the request was checked
                self._send([(request.id, ("refused", str(exc)))])
                self._streams.pop(request.id, None)
        for request_id in cancelled:
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
