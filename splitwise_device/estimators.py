"""Estimates the planners' observation needs, from what the device sees anyway.

- `LinkEstimator` (passive): every cloud segment gives its bytes up and down, its round trip and
  the worker's compute time (reply user property `compute_us`). The network's share of a round
  trip is modelled as `rtt + 8·bytes/bandwidth`: small messages estimate the RTT, large ones the
  bandwidth once the RTT is known (averaged as seconds per bit, so a link that slows down is seen
  at once). Both are EWMAs (`splitwise_core.lyapunov.Ewma`) weighted by the seconds since the
  previous sample, so the estimate follows a changing link. An active probe (the agent's
  `Controller`) refreshes whichever estimate has gone without samples.
- `RateEstimator`: request arrivals per second (EWMA of the instantaneous rate).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from splitwise_core.errors import InvalidArgumentError
from splitwise_core.lyapunov import Ewma

SMALL_MESSAGE_BYTES = 4096  # round trips of messages below this size measure latency, not bandwidth


class LinkEstimator:
    def __init__(self, half_life_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._rtt = Ewma(half_life_s)
        self._seconds_per_bit = Ewma(half_life_s)
        self._last: dict[str, float] = {}
        self._clock = clock
        self._lock = threading.Lock()  # transfers and background probes report from different threads

    def _weight(self, which: str, now: float | None) -> float:
        """Seconds since this estimate's previous sample: its half-life is then in real time."""
        now = self._clock() if now is None else now
        last = self._last.get(which)
        self._last[which] = now
        return 1e-3 if last is None else max(now - last, 1e-3)

    def observe(
        self, bytes_up: int, bytes_down: int, round_trip_s: float, compute_s: float = 0.0, now: float | None = None
    ) -> None:
        if bytes_up < 0 or bytes_down < 0 or not 0 <= compute_s <= round_trip_s:
            raise InvalidArgumentError(
                f"link sample: bytes {bytes_up}/{bytes_down}, round trip {round_trip_s}, compute {compute_s}"
            )
        with self._lock:
            self._observe(bytes_up + bytes_down, round_trip_s - compute_s, now)

    def _observe(self, size: int, network_s: float, now: float | None) -> None:
        if size <= SMALL_MESSAGE_BYTES:
            self._rtt.update(network_s, self._weight("rtt", now))
            return
        rtt = self._rtt.value
        if rtt is None:
            return  # a large transfer alone cannot tell latency from bandwidth
        # A transfer that took no longer than the RTT says the link is faster than this sample can
        # resolve: count it as taking a twentieth of the round trip rather than dropping it.
        transfer_s = max(network_s - rtt, network_s / 20)
        if transfer_s > 0:
            # Averaged as seconds per bit, not bits per second: an average of rates is dominated by
            # the fast samples and would keep a link that just slowed down looking fast.
            self._seconds_per_bit.update(transfer_s / (8 * size), self._weight("bandwidth", now))

    @property
    def rtt_s(self) -> float | None:
        return self._rtt.value

    @property
    def refreshed_at(self) -> float | None:
        """Clock time of the older of the two estimates' newest samples: None until both exist.

        Large transfers refresh only the bandwidth, small ones only the RTT; a probe is due when
        either has gone without a sample for a while.
        """
        if "rtt" not in self._last or "bandwidth" not in self._last:
            return None
        return min(self._last.values())

    @property
    def bandwidth_bps(self) -> float | None:
        spb = self._seconds_per_bit.value
        return None if spb is None else 1.0 / spb


class RateEstimator:
    """Arrivals per second: an EWMA of 1/inter-arrival time, weighted by elapsed time."""

    def __init__(self, half_life_s: float = 30.0) -> None:
        self._rate = Ewma(half_life_s)
        self._last: float | None = None

    def arrival(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None and now > self._last:
            gap = now - self._last
            self._rate.update(1.0 / gap, gap)
        self._last = now

    @property
    def per_second(self) -> float:
        return self._rate.value or 0.0
