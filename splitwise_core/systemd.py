"""systemd service notifications (``sd_notify``), in pure Python with the standard library.

The units in ``deploy/`` use ``Type=notify`` and ``WatchdogSec=``: the agent calls :func:`ready`
once it serves requests, :func:`status` to show a line in ``systemctl status``,
:func:`watchdog_ping` regularly (every :func:`watchdog_interval` / 2 seconds) from the loop whose
liveness matters, and :func:`stopping` when it starts draining on SIGTERM.

Outside systemd (no ``$NOTIFY_SOCKET``) every function is a no-op that returns ``False``; sending
never raises, like ``sd_notify(3)``: a failure to notify must not take the service down.
"""

from __future__ import annotations

import os
import socket

__all__ = [
    "SEND_TIMEOUT_S",
    "extend_timeout",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_ping",
]


SEND_TIMEOUT_S = 1.0
"""Longest wait for room in the service manager's socket queue before :func:`notify` gives up."""


def _socket_address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]  # abstract namespace socket
    if address.startswith("/"):
        return address
    return None  # unset, empty, or a kind we do not speak (e.g. vsock:)


def notify(state: str) -> bool:
    """Sends ``state`` (newline-separated ``KEY=value`` assignments) to the service manager.

    Returns ``True`` if the datagram was sent, ``False`` when not running under a service manager
    that listens (``$NOTIFY_SOCKET`` unset) or when sending failed (including no room in the
    receiver's queue within :data:`SEND_TIMEOUT_S`). Never raises.
    """
    address = _socket_address()
    if address is None or not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Bounded wait: a receiver that stops reading fills its queue (net.unix.max_dgram_qlen),
            # and the agent's loop must not hang on a status line.
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """``READY=1``: start-up is complete (``Type=notify`` units count as started from here)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text is not None else ""))


def stopping(status_text: str | None = None) -> bool:
    """``STOPPING=1``: the service is shutting down (draining); systemd shows it as deactivating."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text is not None else ""))


def status(text: str) -> bool:
    """``STATUS=text``: one line shown by ``systemctl status`` (newlines become spaces)."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    """``WATCHDOG=1``: resets the watchdog timer (send it at least every :func:`watchdog_interval` / 2)."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC``: asks for ``seconds`` more before the current start/stop times out
    (e.g. while draining requests takes longer than expected)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds (``$WATCHDOG_USEC``), or ``None`` if no watchdog is set up
    for this process.

    ``$WATCHDOG_PID``, when set, must be this process's pid (otherwise the watchdog is meant for
    another process, e.g. our parent). Ping at half this interval, as systemd recommends.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
