"""Lyapunov bookkeeping: queues, drift, drift-plus-penalty, estimators and their snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from splitwise_core import errors
from splitwise_core.lyapunov import Ewma, QuantileTracker, QueueBank


def test_queue_bank_follows_the_queue_law_and_reports_exact_drift() -> None:
    rng = np.random.default_rng(0)
    bank = QueueBank(["work_s", "energy_j", "memory"])
    q = np.zeros(3)
    for _ in range(500):
        a, b = rng.exponential(1.0, 3), rng.exponential(1.1, 3)
        before = 0.5 * float(q @ q)
        q = np.maximum(q + a - b, 0.0)
        drift = bank.step(a.tolist(), b.tolist())
        np.testing.assert_allclose(bank.backlog, q, rtol=1e-12, atol=1e-12)
        assert drift == pytest.approx(0.5 * float(q @ q) - before, rel=1e-9, abs=1e-9)
    assert bank.lyapunov() == pytest.approx(0.5 * float(q @ q))
    assert bank["energy_j"] == pytest.approx(q[1])
    assert len(bank) == 3 and bank.names == ["work_s", "energy_j", "memory"]


def test_drift_plus_penalty_is_vectorised_over_actions() -> None:
    rng = np.random.default_rng(1)
    bank = QueueBank(["u", "z"])
    bank.set_backlog([4.0, 0.5])
    n = 1000
    penalty = rng.uniform(0, 2, n)
    arrivals, service = rng.uniform(0, 1, (n, 2)), rng.uniform(0, 1, (n, 2))
    scores = bank.drift_plus_penalty(3.0, penalty, arrivals, service)
    expected = 3.0 * penalty + (arrivals - service) @ np.array([4.0, 0.5])
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    # The drift term steers the choice: with a large work backlog, the action that serves more wins.
    bank.set_backlog([100.0, 0.0])
    fast_but_costly = bank.drift_plus_penalty(
        1.0, np.array([5.0, 1.0]), np.zeros((2, 2)), np.array([[2.0, 0.0], [0.5, 0.0]])
    )
    assert int(np.argmin(fast_but_costly)) == 0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.step([1.0], [1.0, 1.0]), errors.ShapeMismatchError),
        (lambda b: b.step([-1.0, 0.0], [0.0, 0.0]), errors.InvalidArgumentError),
        (lambda b: b.step([float("nan"), 0.0], [0.0, 0.0]), errors.InvalidArgumentError),
        (lambda b: b.set_backlog([1.0, -2.0]), errors.InvalidArgumentError),
        (lambda b: b["nope"], errors.InvalidArgumentError),
        (
            lambda b: b.drift_plus_penalty(1.0, np.zeros(2), np.zeros((2, 3)), np.zeros((2, 3))),
            errors.ShapeMismatchError,
        ),
        (
            lambda b: b.drift_plus_penalty(-1.0, np.zeros(1), np.zeros((1, 2)), np.zeros((1, 2))),
            errors.InvalidArgumentError,
        ),
        (
            lambda b: b.drift_plus_penalty(
                1.0, np.zeros(2), np.zeros((2, 2)).T.copy().T[:, ::1].T.T, np.asfortranarray(np.zeros((2, 2)))
            ),
            errors.LayoutError,
        ),
    ],
)
def test_queue_bank_rejects_bad_input(call, error) -> None:  # type: ignore[no-untyped-def]
    bank = QueueBank(["u", "z"])
    with pytest.raises(error):
        call(bank)


def test_queue_bank_rejects_bad_names() -> None:
    for names in ([], ["a", "a"], ["a", ""]):
        with pytest.raises(errors.InvalidArgumentError):
            QueueBank(names)


def test_ewma_half_life_semantics() -> None:
    ewma = Ewma(half_life=4.0)
    assert ewma.value is None
    ewma.update(100.0)
    for _ in range(4):
        ewma.update(0.0)
    assert ewma.value == pytest.approx(50.0)  # four samples later the first keeps half its weight
    timed = Ewma(half_life=2.0)
    timed.update(10.0, weight=1.0)
    assert timed.update(20.0, weight=2.0) == pytest.approx(15.0)  # 2 s elapsed = one half-life
    assert timed.count == 2
    with pytest.raises(errors.InvalidArgumentError):
        Ewma(half_life=0.0)
    with pytest.raises(errors.InvalidArgumentError):
        timed.update(1.0, weight=-1.0)


@pytest.mark.parametrize(
    "distribution",
    [
        lambda rng, n: rng.lognormal(mean=-3.0, sigma=1.0, size=n),  # latencies in seconds
        lambda rng, n: rng.exponential(0.2, n),
        lambda rng, n: rng.uniform(0.001, 5.0, n),
        lambda rng, n: np.concatenate([rng.normal(0.05, 0.005, n // 2).clip(0), rng.pareto(1.5, n - n // 2)]),
    ],
)
def test_quantile_tracker_error_bound_on_a_million_samples(distribution) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(42)
    samples = distribution(rng, 1_000_000)
    alpha = 0.01
    tracker = QuantileTracker(relative_accuracy=alpha)
    for chunk in np.array_split(samples, 10):  # streamed in pieces
        tracker.add_many(np.ascontiguousarray(chunk))
    assert tracker.count == samples.size
    for q in (0.5, 0.95, 0.99):
        estimate = tracker.quantile(q)
        assert estimate is not None
        lower = np.percentile(samples, 100 * q, method="lower")
        assert abs(estimate - lower) <= alpha * lower * (1 + 1e-9), (q, estimate, lower)
        # Against numpy's default interpolation the bound holds too on this many samples.
        linear = np.percentile(samples, 100 * q)
        assert abs(estimate - linear) <= alpha * linear * 1.001, (q, estimate, linear)
    assert tracker.mean == pytest.approx(samples.mean(), rel=1e-9)
    assert tracker.max == samples.max() and tracker.min == samples.min()


def test_quantile_tracker_small_cases_and_bad_input() -> None:
    tracker = QuantileTracker()
    assert tracker.quantile(0.5) is None
    tracker.add(0.0)
    tracker.add(0.0)
    tracker.add(2.0)
    assert tracker.quantile(0.5) == 0.0
    assert tracker.quantile(1.0) == pytest.approx(2.0, rel=0.01)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(errors.InvalidArgumentError):
            tracker.add(bad)
    with pytest.raises(errors.InvalidArgumentError):
        tracker.add_many(np.array([1.0, -1.0]))
    assert tracker.count == 3  # a rejected batch adds nothing
    with pytest.raises(errors.InvalidArgumentError):
        tracker.quantile(1.5)
    with pytest.raises(errors.InvalidArgumentError):
        QuantileTracker(relative_accuracy=0.9)


def test_snapshots_round_trip_and_reject_corruption() -> None:
    bank = QueueBank(["u", "z"])
    bank.step([3.0, 1.0], [1.0, 0.0])
    ewma = Ewma(5.0)
    ewma.update(7.5)
    tracker = QuantileTracker(0.02)
    tracker.add_many(np.random.default_rng(0).exponential(1.0, 5000))
    for obj, cls in ((bank, QueueBank), (ewma, Ewma), (tracker, QuantileTracker)):
        data = obj.to_bytes()
        restored = cls.from_bytes(data)  # type: ignore[attr-defined]
        assert restored.to_bytes() == data
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        for bad in (bytes(flipped), data[:-3], b"", b"XXXX" + data[4:], data + b"\x00"):
            with pytest.raises(errors.SnapshotError):
                cls.from_bytes(bad)  # type: ignore[attr-defined]
    restored_tracker = QuantileTracker.from_bytes(tracker.to_bytes())
    assert restored_tracker.quantile(0.95) == tracker.quantile(0.95)
    assert QueueBank.from_bytes(bank.to_bytes())["u"] == 2.0
    with pytest.raises(errors.SnapshotError, match="kind"):
        Ewma.from_bytes(bank.to_bytes())
