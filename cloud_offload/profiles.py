"""Worker cost profiles on the broker: what a worker publishes about itself and what devices collect.

Every cloud worker publishes one retained message on
``splitwise/v1/cloud/{pool}/profile/{worker_id}`` (see ``docs/protocol.md``)::

    {"worker_id": "w1", "pool": "default", "model_hash": "<32 hex>", "threads": 4,
     "measured_at": "2026-11-28T13:20:00+00:00", "source": "measured", "profile": {...}}

``profile`` is the JSON form of ``splitwise_core.profile.Profile``, checked against that schema
here (and again by each device that receives it); what its costs mean for a plan is the planner's
business (``cloud_offload`` does not import ``policies``). An empty
retained payload withdraws the worker's profile (a worker clears it when it stops gracefully).

:class:`WorkerProfiles` is the collecting side: it subscribes to the pool's profiles and keeps the
latest valid one per worker; messages for another model, with a worker id that does not match the
topic, or that are not the expected JSON are logged and ignored.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from cloud_offload.mqtt import MqttConnection, mqtt_payload
from cloud_offload.protocol import frames, topics
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.profile import MAX_PROFILE_BYTES, profile_problems

__all__ = [
    "WorkerProfile",
    "WorkerProfiles",
    "measure_profile",
    "parse_profile_message",
    "profile_message",
]

log = logging.getLogger(__name__)

_MESSAGE_KEYS = frozenset({"worker_id", "pool", "model_hash", "threads", "measured_at", "profile"})


def measure_profile(
    model_path: str | Path, threads: int, progress: Callable[[int, int, str], None] | None = None
) -> dict[str, Any]:
    """Runs the profiler's quick settings (``splitwise-device profile --quick``) on this machine and
    returns the profile's JSON value. Takes a few seconds for SmolLM2-135M."""
    from splitwise_core.profiler import Settings, measure, to_profile

    measurement = measure(model_path, threads, Settings.quick(), progress)
    profile: dict[str, Any] = to_profile(measurement).model_dump(mode="json")
    return profile


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def profile_message(
    *,
    worker_id: str,
    pool: str,
    model_hash: bytes,
    threads: int,
    profile: Mapping[str, Any],
    measured_at: str | None = None,
    source: str = "measured",
) -> bytes:
    """The retained payload a worker publishes on ``worker_profile_topic(pool, worker_id)``."""
    return mqtt_payload(
        {
            "worker_id": topics.validate_id(worker_id, "worker id"),
            "pool": topics.validate_id(pool, "pool"),
            "model_hash": _hash16(model_hash).hex(),
            "threads": int(threads),
            "measured_at": measured_at or utc_now(),
            "source": source,
            "profile": dict(profile),
        }
    )


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    """One worker's published profile as received."""

    worker_id: str
    threads: int
    measured_at: str
    source: str
    profile: dict[str, Any]
    received_at: float  # time.monotonic() when it arrived


def parse_profile_message(
    topic: str, payload: bytes | bytearray, *, pool: str, model_hash: bytes
) -> WorkerProfile | None:
    """The profile in one message of ``pool_profile_filter(pool)``; None for an empty payload (the
    worker withdrew it). Raises InvalidArgumentError, saying why, for anything else that is not a
    valid profile of our pool and model."""
    prefix = topics.pool_profile_filter(pool)[:-1]
    if not topic.startswith(prefix):
        raise InvalidArgumentError(f"topic {topic!r} is not a profile topic of pool {pool!r}")
    worker_id = topics.validate_id(topic[len(prefix) :], "worker id in the topic")
    if not payload:
        return None
    if len(payload) > MAX_PROFILE_BYTES:
        raise InvalidArgumentError(f"profile message of {len(payload)} bytes, at most {MAX_PROFILE_BYTES}")
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InvalidArgumentError(f"profile message is not UTF-8 JSON: {err}") from None
    if not isinstance(msg, dict):
        raise InvalidArgumentError(f"profile message is a JSON object, got {type(msg).__name__}")
    missing = sorted(_MESSAGE_KEYS - msg.keys())
    if missing:
        raise InvalidArgumentError(f"profile message lacks {', '.join(missing)}")
    if msg["worker_id"] != worker_id:
        raise InvalidArgumentError(f"worker_id {msg['worker_id']!r} in a message on the topic of {worker_id!r}")
    if msg["pool"] != pool:
        raise InvalidArgumentError(f"pool {msg['pool']!r} in a message of pool {pool!r}")
    if msg["model_hash"] != _hash16(model_hash).hex():
        raise InvalidArgumentError(f"profile for model {msg['model_hash']!r}, ours is {_hash16(model_hash).hex()}")
    threads = msg["threads"]
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InvalidArgumentError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(msg["measured_at"], str):
        raise InvalidArgumentError("measured_at must be a string")
    problems = profile_problems(msg["profile"])
    if problems:
        raise InvalidArgumentError(problems[0])
    return WorkerProfile(
        worker_id=worker_id,
        threads=threads,
        measured_at=msg["measured_at"],
        source=str(msg.get("source", "measured")),
        profile=msg["profile"],
        received_at=time.monotonic(),
    )


def _hash16(model_hash: bytes) -> bytes:
    """The frame's 16-byte model hash field, from itself or from a whole SHA-256 digest."""
    raw = bytes(model_hash)
    if len(raw) == 32:
        return frames.model_hash_prefix(raw)
    if len(raw) != 16:
        raise InvalidArgumentError(f"model hash must be 16 bytes (or a 32-byte SHA-256), got {len(raw)}")
    return raw


class WorkerProfiles:
    """Collects the pool's worker profiles (retained messages) over `connection`; thread-safe.

    Subscribes at construction (the subscription is restored on reconnect by the connection).
    Invalid messages are logged and ignored; an empty payload removes that worker.
    """

    def __init__(self, connection: MqttConnection, pool: str, model_hash: bytes) -> None:
        self.connection = connection
        self.pool = topics.validate_id(pool, "pool")
        self.model_hash = _hash16(model_hash)
        self.filter = topics.pool_profile_filter(self.pool)
        self.ignored = 0  # messages dropped as invalid (for tests and diagnostics)
        self._entries: dict[str, WorkerProfile] = {}
        self._changed = threading.Condition()
        connection.subscribe(self.filter, self._on_message)

    def close(self) -> None:
        self.connection.unsubscribe(self.filter)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            entry = parse_profile_message(msg.topic, msg.payload, pool=self.pool, model_hash=self.model_hash)
        except InvalidArgumentError as err:
            with self._changed:
                self.ignored += 1
            log.warning("ignored a worker profile on %s: %s", msg.topic, err)
            return
        worker_id = msg.topic.rsplit("/", 1)[1]
        with self._changed:
            if entry is None:
                if self._entries.pop(worker_id, None) is not None:
                    log.info("worker %s withdrew its profile", worker_id)
            else:
                self._entries[worker_id] = entry
                log.info("profile of worker %s (%s %s)", worker_id, entry.source, entry.measured_at)
            self._changed.notify_all()

    def profiles(self) -> dict[str, dict[str, Any]]:
        """worker id → its profile's JSON value (a splitwise_core.profile.Profile for the planner to parse)."""
        with self._changed:
            return {wid: e.profile for wid, e in self._entries.items()}

    def entries(self) -> dict[str, WorkerProfile]:
        """worker id → everything received about it (threads, measured_at, received time)."""
        with self._changed:
            return dict(self._entries)

    def wait_for_any(self, timeout: float) -> bool:
        """True as soon as at least one worker's profile is held; False after `timeout` s without."""
        with self._changed:
            return self._changed.wait_for(lambda: bool(self._entries), timeout)
