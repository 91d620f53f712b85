"""MQTT topic names of the protocol (``docs/protocol.md``) and the one validator of a topic name
that the device publishes to (``reply_to``, a ResponseTopic, the error path)."""

from __future__ import annotations

import re

from splitwise_core.errors import InvalidArgumentError

__all__ = [
    "MAX_TOPIC_BYTES",
    "TOPIC_ROOT",
    "device_infer_topic",
    "device_reply_filter",
    "device_reply_topic",
    "device_status_topic",
    "pool_profile_filter",
    "pool_segment_share",
    "pool_segment_topic",
    "topic_name_problem",
    "validate_id",
    "validate_topic_name",
    "worker_profile_topic",
    "worker_segment_topic",
    "worker_status_topic",
]


TOPIC_ROOT = "splitwise/v1"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


# Characters a topic name must not hold: MQTT 5.0 section 1.5.4 forbids U+0000, and mosquitto
# (mosquitto_validate_utf8) disconnects a client whose topic holds a C0/C1 control or a noncharacter
# (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF of every plane) as sending a malformed packet; lone surrogates
# are not UTF-8 at all; + and # are wildcards, valid only in filters.
_NONCHARACTERS = "".join(f"{chr(p | 0xFFFE)}{chr(p | 0xFFFF)}" for p in range(0, 0x110000, 0x10000))
_TOPIC_NAME_FORBIDDEN = re.compile(f"[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ud800-\udfff{_NONCHARACTERS}+#]")
MAX_TOPIC_BYTES = 65535


def topic_name_problem(value: object) -> str | None:
    """Why `value` cannot be the topic of a PUBLISH this side sends (a reply topic an app named), or
    None if it can: a non-empty str of at most 65,535 UTF-8 bytes without U+0000, C0/C1 controls,
    noncharacters (U+FDD0..U+FDEF, U+FFFE, U+FFFF), surrogates or the wildcards ``+`` ``#``, and not
    a ``$``-prefixed system topic. The one check for ``reply_to`` and for a ResponseTopic."""
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value:
        return "empty"
    if value.startswith("$"):
        return "starts with '$' (a broker system topic)"
    bad = _TOPIC_NAME_FORBIDDEN.search(value)
    if bad is not None:
        what = "wildcard" if bad.group() in "+#" else "character"
        return f"contains the {what} {bad.group()!r} at index {bad.start()}"
    if len(value) > MAX_TOPIC_BYTES // 3 and len(value.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"longer than {MAX_TOPIC_BYTES} UTF-8 bytes"
    return None


def validate_topic_name(value: str, what: str = "topic") -> str:
    """`value` if :func:`topic_name_problem` finds nothing, else InvalidArgumentError (a ValueError)."""
    problem = topic_name_problem(value)
    if problem is not None:
        raise InvalidArgumentError(f"{what} is not a valid topic name: {problem}")
    return value


def validate_id(value: str, what: str = "id") -> str:
    """Device, pool, worker ids and reply nonces: 1..64 of [A-Za-z0-9_-] (no MQTT wildcards or '/')."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise InvalidArgumentError(f"{what} must be 1..64 characters of [A-Za-z0-9_-], got {value!r}")
    return value


def device_infer_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/device/{validate_id(device_id, 'device id')}/infer"


def device_status_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/device/{validate_id(device_id, 'device id')}/status"


def device_reply_topic(device_id: str, nonce: str) -> str:
    """The device's private topic for segment replies (its ResponseTopic)."""
    return f"{TOPIC_ROOT}/device/{validate_id(device_id, 'device id')}/reply/{validate_id(nonce, 'nonce')}"


def device_reply_filter(device_id: str) -> str:
    return f"{TOPIC_ROOT}/device/{validate_id(device_id, 'device id')}/reply/+"


def pool_segment_topic(pool: str) -> str:
    """Where a device sends a session's segments until a worker holds its KV."""
    return f"{TOPIC_ROOT}/cloud/{_pool(pool)}/segment"


def pool_segment_share(pool: str) -> str:
    """The shared subscription through which the pool's workers receive new sessions."""
    p = _pool(pool)
    return f"$share/{p}/{TOPIC_ROOT}/cloud/{p}/segment"


def worker_segment_topic(worker_id: str) -> str:
    """Where a device sends the segments of a session that this worker already holds."""
    return f"{TOPIC_ROOT}/cloud/worker/{validate_id(worker_id, 'worker id')}/segment"


def worker_status_topic(worker_id: str) -> str:
    return f"{TOPIC_ROOT}/cloud/worker/{validate_id(worker_id, 'worker id')}/status"


def worker_profile_topic(pool: str, worker_id: str) -> str:
    """Retained: the worker's measured cost profile (JSON); an empty retained payload withdraws it."""
    return f"{TOPIC_ROOT}/cloud/{_pool(pool)}/profile/{validate_id(worker_id, 'worker id')}"


def pool_profile_filter(pool: str) -> str:
    """Every worker profile of the pool (one retained message per worker)."""
    return f"{TOPIC_ROOT}/cloud/{_pool(pool)}/profile/+"


def _pool(pool: str) -> str:
    validate_id(pool, "pool")
    if pool == "worker":
        # "worker" is the level that holds per-worker topics under splitwise/v1/cloud/.
        raise InvalidArgumentError("pool 'worker' is reserved")
    return pool
