"""SIGINT and SIGTERM as a request to stop, for the long-running commands (serve, simulate,
``rollout status --watch``).

Python's default Ctrl-C raises KeyboardInterrupt between any two bytecodes of the main thread,
also between a lock's acquire and the ``try`` that releases it: a store or connection lock
left held that way deadlocks the teardown that follows (serve's workers, the watcher's store)
and the command hangs instead of exiting. So these commands only *record* a signal here and
poll for it at points where stopping is safe.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

__all__ = ["StopRequest", "exit_code_for"]


def exit_code_for(signum: int | None) -> int:
    """0 when a run ended by itself; 128 + the signal otherwise (130 SIGINT, 143 SIGTERM)."""
    return 0 if signum is None else 128 + signum


class StopRequest:
    """While the context is open (main thread only), SIGINT and SIGTERM set :attr:`signum`
    instead of raising; the previous handlers come back on exit. It quacks like the part of
    ``threading.Event`` a polling loop uses (:meth:`is_set`, :meth:`wait`), without the
    Event's lock: taking a lock in a signal handler could deadlock the thread it interrupts."""

    POLL_S = 0.05

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum

    def set(self) -> None:
        """Ask to stop from code (a ``--duration`` that ended counts as no signal)."""
        self.signum = self.signum or -1

    def is_set(self) -> bool:
        return self.signum is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds (None: until asked), less if asked to stop; True once asked."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.signum is None:
            left = self.POLL_S if end is None else end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, self.POLL_S))
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum and self.signum > 0 else None

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum if self.signum and self.signum > 0 else None)
