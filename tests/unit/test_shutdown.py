"""StopRequest with real signals in real processes: a stop signal ends the wait however often the
main loop waits, from whichever thread it arrives, and the old handlers come back on close."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

from splitwise_core.shutdown import StopRequest

# `threading.Event` set from the handler instead hung in this loop in 5 runs out of 5 (it cannot be a
# test: whether the signal lands while wait() holds the Event's lock is a matter of timing).
HOT_LOOP = textwrap.dedent(
    """
    {setup}
    print("ready", flush=True)
    while not stop.wait(0.0):  # a main loop that waits all the time: the signal lands inside wait()
        pass
    print("stopped", flush=True)
    """
)
WITH_STOP_REQUEST = "from splitwise_core.shutdown import StopRequest\nstop = StopRequest()"


def stopped_within(setup: str, seconds: float) -> bool:
    child = subprocess.Popen(
        [sys.executable, "-c", HOT_LOOP.format(setup=setup)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    finally:
        if child.poll() is None:
            child.kill()
        _, err = child.communicate()
    assert child.returncode == 0, err
    return True


def test_sigterm_ends_a_main_loop_that_waits_all_the_time() -> None:
    assert all(stopped_within(WITH_STOP_REQUEST, 10) for _ in range(3))


def test_a_signal_sent_from_another_thread_wakes_the_wait_and_close_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest((signal.SIGUSR1,)) as stop:
        assert not stop.is_set()
        threading.Timer(0.2, signal.raise_signal, (signal.SIGUSR1,)).start()
        started = time.monotonic()
        assert stop.wait(30)
        assert time.monotonic() - started < 10
        assert stop.received is signal.SIGUSR1
        assert stop.wait(0)  # stays set
    assert signal.getsignal(signal.SIGUSR1) == before


def test_wait_times_out_without_a_signal() -> None:
    with StopRequest((signal.SIGUSR2,)) as stop:
        started = time.monotonic()
        assert not stop.wait(0.3)
        assert time.monotonic() - started >= 0.25
        assert stop.received is None


def test_other_signals_on_the_wakeup_fd_do_not_stop() -> None:
    with StopRequest((signal.SIGUSR2,)) as stop:
        previous = signal.signal(signal.SIGUSR1, lambda *_: None)
        try:
            signal.raise_signal(signal.SIGUSR1)
            assert not stop.wait(0.1)
        finally:
            signal.signal(signal.SIGUSR1, previous)
