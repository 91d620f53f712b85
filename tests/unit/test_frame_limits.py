"""The worker's front door without a broker: a `stop()` that never raises when the broker is gone."""

from __future__ import annotations

from typing import Any

import pytest

from cloud_offload.local_broker import free_port
from cloud_offload.mqtt import BrokerSettings
from cloud_offload.worker import CloudWorker
from splitwise_device.tokenizer import bundled_model_path

# --- stop() with the broker gone ----------------------------------------------------------------------


class _FailingInfo:
    def wait_for_publish(self, timeout: float | None = None) -> bool:
        raise RuntimeError("Message publish failed: The client is not currently connected.")


@pytest.mark.parametrize("failure", ["wait", "publish"])
def test_stop_never_raises_when_the_broker_is_gone(failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w = CloudWorker(
        bundled_model_path(),
        worker_id="wgone",
        pool="unit",
        broker=BrokerSettings("127.0.0.1", free_port()),
    )
    w.start(connect_timeout=None)  # nothing listens there

    def publish(*_args: Any, **_kw: Any) -> _FailingInfo:
        if failure == "publish":
            raise RuntimeError("the client is gone")
        return _FailingInfo()

    monkeypatch.setattr(w.connection, "publish", publish)
    w.stop()  # must not raise
    assert not w._compute.is_alive()
