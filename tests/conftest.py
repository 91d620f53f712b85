"""Shared fixtures. `mosquitto_broker` starts a real broker on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_offload.local_broker import LocalBroker, free_port, mosquitto_binary

# The names tests use; one implementation with the demo and the benchmarks.
MosquittoBroker = LocalBroker
_free_port = free_port
_mosquitto_binary = mosquitto_binary


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    broker = LocalBroker(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
