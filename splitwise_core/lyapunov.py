"""Lyapunov bookkeeping for the planners.

- :class:`QueueBank` — named virtual queues ``Q(t+1) = max(Q(t) + a - b, 0)``, the quadratic
  Lyapunov function ``½ΣQ²``, per-step drift, and the vectorised drift-plus-penalty score
  ``V·penalty + Σ_i Q_i·(a_i - b_i)`` for a batch of candidate actions (float64 arrays:
  ``penalty`` of shape ``(n,)``, ``arrivals``/``service`` of shape ``(n, len(bank))``).
- :class:`Ewma` — moving average whose samples lose half their influence after ``half_life``
  units of weight (pass elapsed seconds as the weight for a time-based average).
- :class:`QuantileTracker` — streaming quantiles: ``quantile(q)`` is within
  ``relative_accuracy·x`` of ``x``, the sample of rank ``floor(q·(n-1))`` (numpy's
  ``method="lower"``), whatever the number of samples.

Each type round-trips through ``to_bytes()``/``from_bytes()`` (versioned, CRC-checked), which the
agent uses to persist its state across restarts.
"""

from __future__ import annotations

from splitwise_core._core import Ewma, QuantileTracker, QueueBank

__all__ = ["Ewma", "QuantileTracker", "QueueBank"]
