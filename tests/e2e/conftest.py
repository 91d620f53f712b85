"""Process-level fixtures: real mosquitto, real worker and agent processes, an MQTT v5 test app.

`system` gives a `System` bound to a fresh broker: `start_worker()` runs
``python -m cloud_offload.cli serve`` (optionally through a `LinkProxy`), `start_agent()` runs
``python -m splitwise_device run --config device.toml`` with short deadlines and a small retry
budget, and `app` asks the agent over MQTT v5 (ResponseTopic + CorrelationData) the way an IoT app
does. The app also listens on the device's reply topics, so a test sees which worker answered each
segment (the `worker_id` user property). Teardown stops only the processes the test started.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_offload import protocol
from cloud_offload.mqtt import BrokerSettings, MqttConnection, user_property
from splitwise_device.engine import Engine
from splitwise_device.tokenizer import bundled_model_path
from tests.conftest import MosquittoBroker
from tests.support.linkproxy import LinkProxy
from tests.support.processes import Proc, write_toml

DEVICE_ID = "e2e-dev"
POOL = "e2e"

# The device's recovery settings: short enough that every fault test finishes in seconds.
AGENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "agent": {"codec": "f32", "status_interval_s": 5, "drain_timeout_s": 2},
    "cloud": {"pool": POOL, "segment_timeout_s": 1.0},
    "recovery": {"base_s": 0.05, "cap_s": 0.5, "factor": 2.0, "max_tries": 4, "ban_s": 30},
    "broker": {"reconnect_min_s": 1, "reconnect_max_s": 2},
}


@dataclass
class Asked:
    """One request in flight: every reply that carried its CorrelationData, in arrival order."""

    correlation: bytes
    request: dict[str, Any]
    replies: list[dict[str, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    sent_at: float = field(default_factory=time.monotonic)

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [r for r in self.replies if r.get("type") == "chunk"]

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [r for r in self.replies if r.get("type") in ("final", "error")]

    def wait_chunks(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.chunks) < n and not self.done.is_set():
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} chunks within {timeout}s: {self.replies}")
            time.sleep(0.005)

    def wait(self, timeout: float) -> Asked:
        self.wait_final(timeout)
        return self

    def wait_final(self, timeout: float) -> dict[str, Any]:
        if not self.done.wait(timeout):
            raise AssertionError(f"no final reply within {timeout}s; got {len(self.replies)} replies: {self.replies}")
        return self.finals[0]


class App:
    """The test's MQTT v5 client: asks the agent, watches statuses and the device's reply traffic."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.conn = MqttConnection(settings, f"e2e-app-{uuid.uuid4().hex[:6]}")
        # Reconnect faster than the services (1 s) so that after a broker restart the app is
        # subscribed again before the agent flushes the replies it queued meanwhile.
        self.conn.client.reconnect_delay_set(min_delay=0.1, max_delay=0.2)  # type: ignore[arg-type]
        self.reply_topic = f"e2e/app/{uuid.uuid4().hex[:8]}/reply"
        self.status: dict[str, str] = {}
        self.asked: dict[bytes, Asked] = {}
        self.unmatched: list[Any] = []
        self.segment_replies: list[tuple[float, str | None]] = []  # (time, worker_id) of worker replies
        self._lock = threading.Lock()
        self.conn.subscribe(self.reply_topic, self._on_reply)
        self.conn.subscribe(protocol.device_status_topic(DEVICE_ID), self._on_status)
        self.conn.subscribe(f"{protocol.TOPIC_ROOT}/cloud/worker/+/status", self._on_status)
        self.conn.subscribe(protocol.device_reply_filter(DEVICE_ID), self._on_segment_reply)

    def start(self) -> None:
        self.conn.start(timeout=10)

    def stop(self) -> None:
        self.conn.stop()

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            state = json.loads(msg.payload).get("state", "?")
        except (ValueError, AttributeError):
            state = bytes(msg.payload).decode(errors="replace")
        with self._lock:
            self.status[msg.topic] = state

    def _on_segment_reply(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.segment_replies.append((time.monotonic(), user_property(msg, "worker_id")))

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        try:
            reply = json.loads(msg.payload)
        except ValueError:
            reply = {"unparsable": bytes(msg.payload).decode(errors="replace")}
        with self._lock:
            asked = self.asked.get(bytes(correlation)) if correlation is not None else None
            if asked is None:
                self.unmatched.append(reply)
                return
            asked.replies.append(reply)
            if reply.get("type") in ("final", "error"):
                asked.done.set()

    def ask(self, request: dict[str, Any]) -> Asked:
        correlation = uuid.uuid4().bytes
        asked = Asked(correlation, request)
        with self._lock:
            self.asked[correlation] = asked
        info = self.conn.publish(
            protocol.device_infer_topic(DEVICE_ID),
            json.dumps(request),
            response_topic=self.reply_topic,
            correlation_data=correlation,
        )
        info.wait_for_publish(5)
        return asked

    def probe_pool(self, timeout: float = 0.3) -> str | None:
        """Publishes a junk frame to the pool topic: the worker the shared subscription hands it to
        answers `bad_frame` (its id in the reply), a hung one does not (None). Moves the pool's
        round robin by one."""
        replies: queue.Queue[str | None] = queue.Queue()
        topic = f"{self.reply_topic}/probe/{uuid.uuid4().hex[:8]}"
        self.conn.subscribe(topic, lambda msg: replies.put(user_property(msg, "worker_id")))
        time.sleep(0.05)  # the SUBACK
        try:
            self.conn.publish(protocol.pool_segment_topic(POOL), b"not a frame", response_topic=topic)
            try:
                return replies.get(timeout=timeout)
            except queue.Empty:
                return None
        finally:
            self.conn.unsubscribe(topic)

    def last_worker(self) -> str | None:
        with self._lock:
            return self.segment_replies[-1][1] if self.segment_replies else None

    def workers_seen(self, since: float = 0.0) -> list[str | None]:
        with self._lock:
            return [w for t, w in self.segment_replies if t >= since]

    def wait_status(self, topic: str, state: str, timeout: float, procs: list[Proc]) -> None:
        deadline = time.monotonic() + timeout
        while self.status.get(topic) != state:
            for proc in procs:
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic} not {state!r} within {timeout}s (now {self.status.get(topic)!r})")
            time.sleep(0.02)


class System:
    """Broker + the processes one test starts; `close()` stops exactly those."""

    def __init__(self, broker: MosquittoBroker, workdir: Path) -> None:
        self.broker = broker
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.proxies: list[LinkProxy] = []
        self.workers: dict[str, Proc] = {}
        self.agent: Proc | None = None
        self.app = App(BrokerSettings(broker.host, broker.port))
        self.app.start()

    def proxy(self) -> LinkProxy:
        proxy = LinkProxy(self.broker.host, self.broker.port).start()
        self.proxies.append(proxy)
        return proxy

    def start_worker(self, worker_id: str, *, broker_url: str | None = None, wait: bool = True) -> Proc:
        args = [
            "cloud_offload.cli",
            "serve",
            "--broker",
            broker_url or self.broker.url,
            "--model",
            str(bundled_model_path()),
            "--worker-id",
            worker_id,
            "--pool",
            POOL,
            "--profile",
            "off",  # no background profiling beside the timing-sensitive fault tests
        ]
        proc = Proc(f"worker {worker_id}", args, self.workdir / f"worker-{worker_id}.log")
        self.procs.append(proc)
        self.workers[worker_id] = proc
        if wait:
            self.app.wait_status(protocol.worker_status_topic(worker_id), "online", 60, [proc])
        return proc

    def wait_workers(self, timeout: float = 60.0) -> None:
        for worker_id, proc in self.workers.items():
            self.app.wait_status(protocol.worker_status_topic(worker_id), "online", timeout, [proc])

    def start_agent(self, **overrides: dict[str, Any]) -> Proc:
        sections: dict[str, dict[str, Any]] = {
            "device": {
                "id": DEVICE_ID,
                "model": str(bundled_model_path()),
                "threads": 1,
                "state_dir": str(self.workdir),
            },
            "broker": {"url": self.broker.url},
        }
        for name, values in AGENT_DEFAULTS.items():
            sections.setdefault(name, {}).update(values)
        for name, values in overrides.items():
            sections.setdefault(name, {}).update(values)
        config = write_toml(self.workdir / "device.toml", sections)
        proc = Proc("device agent", ["splitwise_device", "run", "--config", str(config)], self.workdir / "agent.log")
        self.procs.append(proc)
        self.agent = proc
        self.app.wait_status(protocol.device_status_topic(DEVICE_ID), "online", 60, [proc])
        return proc

    def serving_worker(self, timeout: float = 10.0) -> str:
        """The worker that answered the newest segment reply."""
        deadline = time.monotonic() + timeout
        while (worker := self.app.last_worker()) is None:
            if time.monotonic() > deadline:
                raise AssertionError("no worker reply seen on the device's reply topic")
            time.sleep(0.005)
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.tail(40)}" for p in self.procs)

    def close(self) -> None:
        # The agent first (it drains), then the workers; every proxy; only what this test started.
        for proc in sorted(self.procs, key=lambda p: p is not self.agent):
            proc.stop()
        for proxy in self.proxies:
            proxy.stop()
        self.app.stop()


@pytest.fixture
def system(mosquitto_broker: MosquittoBroker, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[System]:
    sys_ = System(mosquitto_broker, tmp_path)
    try:
        yield sys_
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(sys_.logs())
        sys_.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(bundled_model_path(), threads=1)


_REFERENCE: dict[tuple[str, int], Any] = {}


@pytest.fixture(scope="session")
def reference(engine: Engine) -> Any:
    """Local greedy generation of a user message: what every split run must reproduce (f32)."""

    def generate(content: str, max_tokens: int) -> Any:
        key = (content, max_tokens)
        if key not in _REFERENCE:
            _REFERENCE[key] = engine.generate(messages=[{"role": "user", "content": content}], max_tokens=max_tokens)
        return _REFERENCE[key]

    return generate


__all__ = ["App", "Asked", "Proc", "System"]
