"""Shared fixtures and settings. `mosquitto_broker` starts a real broker on a free loopback port.

Hypothesis settings for the whole suite: the "ci" profile when the CI environment variable is set
(to any value, as Hypothesis itself decides), else "dev"; ``pytest --hypothesis-profile NAME``
overrides the choice. Neither profile sets max_examples: every test keeps the example count it asks for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cloud_offload.local_broker import LocalBroker, free_port, mosquitto_binary

# The deadline (200 ms by default) and the too_slow health check time single examples by the wall
# clock; on a shared 2-core machine they measure the neighbours' load, not the code, and fail at
# random. CI's verdict must depend only on the commit, so CI drops both (a test that hangs is still
# stopped: pytest-timeout's per-test limit, pyproject.toml), replays the same examples on every run
# (derandomize: a red run means the code changed, not that the dice did), keeps no example database
# (CI machines start clean anyway) and prints the blob that reproduces a failure elsewhere with
# @reproduce_failure. Development runs keep exploring new random examples and the local database,
# with a deadline far above what any example here needs (milliseconds) that still flags one that
# has become pathologically slow. (Recent Hypothesis ships a built-in "ci" profile with these values;
# registering it here keeps them on every Hypothesis version pyproject.toml allows.)
_DEFAULT = settings.get_profile("default")  # Hypothesis' own defaults, whichever profile is loaded now
settings.register_profile(
    "ci",
    _DEFAULT,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
    print_blob=True,
)
settings.register_profile("dev", _DEFAULT, deadline=timedelta(seconds=1))
settings.load_profile("ci" if "CI" in os.environ else "dev")

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
