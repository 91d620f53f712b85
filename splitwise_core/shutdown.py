"""SIGTERM/SIGINT as something a service's main loop can wait on.

The obvious ``signal.signal(SIGTERM, lambda *_: stop.set())`` with a ``threading.Event`` can hang
the service for good: Python runs a signal handler in the main thread between two bytecodes, and
if those bytecodes are inside ``stop.wait()`` while it holds the Event's internal lock, ``set()``
waits for that lock, which its own thread holds. Here the handler only records the signal, and
``signal.set_wakeup_fd`` (written by the interpreter's C-level handler, in whatever thread the
signal lands) wakes the wait.
"""

from __future__ import annotations

import select
import signal
import socket
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopRequest"]


class StopRequest:
    """Installs handlers for `signals` (main thread only) until `close()`; `wait(timeout)` returns
    True once one of them has arrived."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._signals = signals
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self.received: signal.Signals | None = None
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous: dict[signal.Signals, Any] = {sig: signal.signal(sig, self._record) for sig in signals}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def is_set(self) -> bool:
        return self.wait(0)

    def wait(self, timeout: float) -> bool:
        """Waits up to `timeout` s for a stop signal; True once one has arrived (now or before)."""
        if self.received is None:
            select.select([self._reader], [], [], max(timeout, 0.0))
            # The wakeup fd carries the signal numbers: read them rather than rely on the Python-level
            # handler having run already (it runs in the main thread at its next bytecode boundary).
            try:
                numbers = self._reader.recv(4096)
            except BlockingIOError:
                numbers = b""
            for number in numbers:
                if number in self._signals and self.received is None:
                    self.received = signal.Signals(number)
        return self.received is not None

    def close(self) -> None:
        """Restores the previous handlers and wakeup fd."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()
