"""Active link probes: a rate-limited measurement of round-trip time and bandwidth to a worker.

Segments already feed the device's link estimate; probes fill the gaps (an idle device, an
edge-only plan) at a bounded cost. One :meth:`LinkProber.probe` sends a small probe (latency) and
then a large one (bandwidth), sequentially, to a pool's segment topic (any worker, via the shared
subscription) or to one worker's topic; at most one such pair per ``min_interval_s``. The frame
format is ``FrameKind.PROBE`` / ``PROBE_REPLY`` in ``docs/protocol.md``.

Each :class:`ProbeResult` fits ``splitwise_device.estimators.LinkEstimator.observe(bytes_up,
bytes_down, round_trip_s, compute_s)``. The worker answers probes through the same queue as
segments, so a probe's round trip includes the time it waited behind them there (``compute_s``
covers only the worker's own handling of the probe).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from cloud_offload.mqtt import RpcClient, user_property
from cloud_offload.protocol import frames
from cloud_offload.protocol.frames import FrameKind
from splitwise_core.errors import FrameError, InvalidArgumentError, SplitwiseError

__all__ = ["LinkProber", "ProbeResult", "worker_time_s"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One answered probe: MQTT payload sizes each way, the wall-clock round trip measured here, the
    worker's own handling time (its ``compute_us`` user property, clamped to the round trip)."""

    bytes_up: int
    bytes_down: int
    round_trip_s: float
    compute_s: float
    worker_id: str | None


class LinkProber:
    """Sends probe pairs over `rpc` to `topic`, at most one pair every `min_interval_s` seconds.

    `small_bytes` and `large_bytes` are the frame sizes of the probes and of the replies they ask
    for (clamped to ``PROBE_MIN_SIZE`` … ``MAX_PROBE_SIZE``). A probe without an answer within
    `timeout_s`, or answered with an error frame, yields no result (logged), never an exception.
    Thread-safe: concurrent calls share the rate limit.
    """

    def __init__(
        self,
        rpc: RpcClient,
        topic: str,
        *,
        min_interval_s: float = 5.0,
        small_bytes: int = 64,
        large_bytes: int = 64 * 1024,
        timeout_s: float = 2.0,
    ) -> None:
        if not min_interval_s >= 0 or not timeout_s > 0:
            raise InvalidArgumentError(f"min_interval_s {min_interval_s} must be >= 0 and timeout_s {timeout_s} > 0")
        self.rpc = rpc
        self.topic = topic
        self.min_interval_s = float(min_interval_s)
        self.timeout_s = float(timeout_s)
        self.sizes = tuple(_clamp(n) for n in (small_bytes, large_bytes))
        self.sent = 0  # probes published
        self.failed = 0  # probes without a usable answer (timeout or error frame)
        self._last: float | None = None
        self._lock = threading.Lock()

    def probe(self, now: float | None = None) -> list[ProbeResult] | None:
        """None (and nothing sent) if the previous pair started less than `min_interval_s` ago
        (`now`: a ``time.monotonic()`` reading, default the current one); else the results of one
        small and one large probe — fewer if some were not answered."""
        t = time.monotonic() if now is None else now
        with self._lock:
            if self._last is not None and t - self._last < self.min_interval_s:
                return None
            self._last = t
            results = []
            for size in self.sizes:
                result = self._one(size)
                if result is not None:
                    results.append(result)
            return results

    def _one(self, size: int) -> ProbeResult | None:
        probe_id = uuid.uuid4()
        payload = frames.encode_probe(size=size, reply_size=size, probe_id=probe_id)
        started = time.perf_counter()
        correlation, future = self.rpc.request(self.topic, payload, expiry_s=self.timeout_s)
        self.sent += 1
        try:
            msg = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.rpc.cancel(correlation)
            self.failed += 1
            log.info("probe of %d bytes to %s: no answer within %.1f s", size, self.topic, self.timeout_s)
            return None
        except SplitwiseError as err:  # e.g. the publish failed outright
            self.failed += 1
            log.info("probe of %d bytes to %s failed: %s", size, self.topic, err)
            return None
        round_trip = time.perf_counter() - started
        try:
            frame = frames.decode_frame(msg.payload)
            if frame.kind is FrameKind.ERROR:
                code, message = frame.error()
                raise FrameError("bad_probe", f"the worker answered {code}: {message}")
            if frame.kind is not FrameKind.PROBE_REPLY or frame.session != probe_id:
                raise FrameError("bad_probe", f"a {frame.kind.name.lower()} frame instead of this probe's reply")
        except FrameError as err:
            self.failed += 1
            log.warning("probe of %d bytes to %s: %s", size, self.topic, err)
            return None
        return ProbeResult(
            bytes_up=len(payload),
            bytes_down=len(msg.payload),
            round_trip_s=round_trip,
            compute_s=min(worker_time_s(msg) or 0.0, round_trip),
            worker_id=user_property(msg, "worker_id"),
        )


def worker_time_s(msg: mqtt.MQTTMessage) -> float | None:
    """The worker's share of a round trip, in seconds: its own handling (user property
    ``compute_us``) plus the wait in its inbox behind other work (``queue_us``, 0 if absent).

    The properties are decimal strings only because MQTT carries strings; this is the one place
    they are parsed. None when ``compute_us`` is missing, either is not an integer, or the sum is
    negative; the caller treats None as "no worker time" (0)."""
    compute, queued = user_property(msg, "compute_us"), user_property(msg, "queue_us")
    if compute is None:
        return None
    try:
        total_us = int(compute) + int(queued or 0)
    except ValueError:
        return None
    return total_us / 1e6 if total_us >= 0 else None


def _clamp(n: int) -> int:
    return min(max(int(n), frames.PROBE_MIN_SIZE), frames.MAX_PROBE_SIZE)
