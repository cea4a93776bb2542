"""Stopping on request: SIGINT/SIGTERM end a run at the next step boundary, with a checkpoint."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("loratune")


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
                    "(Ctrl-C again to abort without saving)")

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
