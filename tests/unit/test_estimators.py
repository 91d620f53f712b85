"""Passive link and arrival-rate estimates from the samples the device sees."""

from __future__ import annotations

import pytest

from splitwise_core.errors import InvalidArgumentError
from splitwise_device.estimators import LinkEstimator, RateEstimator


def test_link_estimator_recovers_rtt_and_bandwidth() -> None:
    link = LinkEstimator(half_life_s=5.0)
    rtt, bandwidth = 0.020, 10e6  # 20 ms, 10 Mbit/s
    now = 0.0
    for i in range(200):
        now += 0.1
        size = 700 if i % 2 else 200_000  # decode-size segments and big prefill segments
        compute = 0.003
        link.observe(size // 2, size - size // 2, rtt + 8 * size / bandwidth + compute, compute, now=now)
    assert link.rtt_s == pytest.approx(rtt + 8 * 700 / bandwidth, rel=0.02)
    assert link.bandwidth_bps == pytest.approx(bandwidth, rel=0.05)


def test_link_estimator_follows_a_bandwidth_drop() -> None:
    link = LinkEstimator(half_life_s=2.0)
    now = 0.0
    for bandwidth in (100e6, 10e6):
        for _ in range(100):
            now += 0.1
            link.observe(300, 300, 0.005, 0.0, now=now)
            now += 0.1
            link.observe(100_000, 100_000, 0.005 + 8 * 200_000 / bandwidth, 0.0, now=now)
        assert link.bandwidth_bps == pytest.approx(bandwidth, rel=0.1)


def test_a_transfer_faster_than_the_rtt_noise_still_gives_a_bandwidth() -> None:
    link = LinkEstimator(half_life_s=5.0)
    link.observe(100, 100, 0.0015, now=1.0)
    assert link.refreshed_at is None  # no bandwidth yet
    link.observe(65_536, 100, 0.0014, now=2.0)  # quicker than the small message: a fast LAN
    assert link.bandwidth_bps is not None and link.bandwidth_bps >= 8 * 65_636 / 0.0014
    assert link.refreshed_at == 1.0  # the RTT's newest sample is the older one


def test_link_estimator_rejects_impossible_samples() -> None:
    with pytest.raises(InvalidArgumentError):
        LinkEstimator().observe(10, 10, 0.01, compute_s=0.02)
    with pytest.raises(InvalidArgumentError):
        LinkEstimator().observe(-1, 10, 0.01)


def test_arrival_rate() -> None:
    rate = RateEstimator(half_life_s=10.0)
    assert rate.per_second == 0.0
    for i in range(100):
        rate.arrival(now=i * 0.5)  # 2 requests per second
    assert rate.per_second == pytest.approx(2.0, rel=1e-6)
