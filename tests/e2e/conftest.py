"""Process-level fixtures: real mosquitto, real worker and agent processes, an MQTT v5 test app.

`system` gives a `System` bound to a fresh broker: `start_worker()` runs
``python -m cloud_offload.cli serve`` (optionally through a `LinkProxy`), `start_agent()` runs
``python -m splitwise_device run --config device.toml`` with short deadlines and a small retry
budget, and `app` asks the agent over MQTT v5 (ResponseTopic + CorrelationData) the way an IoT app
does. The app also listens (without a shared subscription) on the pool's and the workers' segment
topics and on the device's reply topics, so a test sees every segment attempt (its CorrelationData
and size), which worker answered it (the `worker_id` user property) and the round trip.
`logged_system` is the same with a broker that logs every packet (`BrokerLog`): the one record of
which client a shared subscription handed a message to. Teardown stops only the processes the test
started.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest

from cloud_offload.mqtt import BrokerSettings, MqttConnection, user_property
from cloud_offload.protocol import topics
from evaluation.linkproxy import LinkProxy
from evaluation.processes import Proc, write_toml
from splitwise_core.engine import Engine
from splitwise_core.tokenizer import bundled_model_path
from tests.conftest import MosquittoBroker

T = TypeVar("T")

DEVICE_ID = "e2e-dev"
POOL = "e2e"
WORKER_CLIENT = "splitwise-cloud-"  # + worker id: a worker's MQTT client id
PROBE_FRAME = b"not a frame"  # what `System.probe_pool` publishes (a worker answers bad_frame)

# The device's recovery settings. A silent worker costs the fault tests 2 segment timeouts before
# its ban, so the timeout is as short as it can be while no healthy worker ever misses it: a miss on
# a loaded machine means retries, a ban of the survivor and a fallback to the edge, i.e. a red test.
# Segment round trips of this system as the app sees them (2 workers, agent, 3 × 40 tokens each of
# layer-split:10 / cloud-only / heads:4 on a 2-core machine beside other test runs, load average 2
# to 8; the largest is the cloud-only prefill, which a failover also replays as its first checkpoint):
#                         largest prefill     decode p99 / max
#   other core idle         0.45 s            0.03 / 0.03 s
#   1 busy loop             0.78 s            0.08 / 0.11 s
#   2 busy loops            1.39 s            0.14 / 0.24 s
#   4 busy loops            2.32 s            0.30 / 0.31 s
# (round trips grow with the CPU share the worker gets). The old 1 s timeout is missed with two busy
# loops (with four, the hung-worker test fell back to the edge: the survivor "did not answer the
# checkpoint replay"); 5 s is 3.6× the two-loop worst and 2.2× the four-loop worst. A ban outlasts
# any test here (its worker answering is what lifts it), so the hung-worker test's second round
# still meets the first victim banned however slow the machine is.
SEGMENT_TIMEOUT_S = 5.0
AGENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "agent": {"codec": "f32", "status_interval_s": 5, "drain_timeout_s": 2},
    "cloud": {"pool": POOL, "segment_timeout_s": SEGMENT_TIMEOUT_S},
    "recovery": {"base_s": 0.05, "cap_s": 0.5, "factor": 2.0, "max_tries": 4, "ban_s": 300},
    "broker": {"reconnect_min_s": 1, "reconnect_max_s": 2},
}


@dataclass
class Asked:
    """One request in flight: every reply that carried its CorrelationData, in arrival order."""

    correlation: bytes
    request: dict[str, Any]
    changed: threading.Condition  # the app's: notified whenever a reply arrives
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
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.chunks) >= n or self.done.is_set(), timeout):
                raise AssertionError(f"fewer than {n} chunks within {timeout}s: {self.replies}")

    def wait(self, timeout: float) -> Asked:
        self.wait_final(timeout)
        return self

    def wait_final(self, timeout: float) -> dict[str, Any]:
        if not self.done.wait(timeout):
            raise AssertionError(f"no final reply within {timeout}s; got {len(self.replies)} replies: {self.replies}")
        return self.finals[0]


@dataclass(frozen=True)
class SegmentRequest:
    """A message on the pool's or a worker's segment topic, as the app's own subscription saw it."""

    at: float
    topic: str
    correlation: bytes | None  # None: not an attempt that expects a reply (CLOSE, a test's junk frame)
    size: int


@dataclass(frozen=True)
class SegmentReply:
    at: float
    correlation: bytes | None
    worker: str | None


class App:
    """The test's MQTT v5 client: asks the agent, watches statuses and the segment traffic."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.conn = MqttConnection(settings, f"e2e-app-{uuid.uuid4().hex[:6]}")
        # Reconnect faster than the services (1 s) so that after a broker restart the app is
        # subscribed again before the agent flushes the replies it queued meanwhile.
        self.conn.client.reconnect_delay_set(min_delay=0.1, max_delay=0.2)  # type: ignore[arg-type]
        self.reply_topic = f"e2e/app/{uuid.uuid4().hex[:8]}/reply"
        self.status: dict[str, str] = {}
        self.asked: dict[bytes, Asked] = {}
        self.unmatched: list[Any] = []
        self.segment_requests: list[SegmentRequest] = []
        self.segment_replies: list[SegmentReply] = []
        self._changed = threading.Condition()  # guards the above; notified on every change
        self.conn.subscribe(self.reply_topic, self._on_reply)
        self.conn.subscribe(topics.device_status_topic(DEVICE_ID), self._on_status)
        self.conn.subscribe(f"{topics.TOPIC_ROOT}/cloud/worker/+/status", self._on_status)
        self.conn.subscribe(topics.device_reply_filter(DEVICE_ID), self._on_segment_reply)
        self.conn.subscribe(topics.pool_segment_topic(POOL), self._on_segment_request)
        self.conn.subscribe(f"{topics.TOPIC_ROOT}/cloud/worker/+/segment", self._on_segment_request)

    def start(self) -> None:
        self.conn.start(timeout=10)

    def stop(self) -> None:
        self.conn.stop()

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            state = json.loads(msg.payload).get("state", "?")
        except (ValueError, AttributeError):
            state = bytes(msg.payload).decode(errors="replace")
        with self._changed:
            self.status[msg.topic] = state
            self._changed.notify_all()

    def _on_segment_request(self, msg: mqtt.MQTTMessage) -> None:
        request = SegmentRequest(time.monotonic(), msg.topic, _correlation(msg), len(msg.payload))
        with self._changed:
            self.segment_requests.append(request)
            self._changed.notify_all()

    def _on_segment_reply(self, msg: mqtt.MQTTMessage) -> None:
        reply = SegmentReply(time.monotonic(), _correlation(msg), user_property(msg, "worker_id"))
        with self._changed:
            self.segment_replies.append(reply)
            self._changed.notify_all()

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        correlation = _correlation(msg)
        try:
            reply = json.loads(msg.payload)
        except ValueError:
            reply = {"unparsable": bytes(msg.payload).decode(errors="replace")}
        with self._changed:
            asked = self.asked.get(correlation) if correlation is not None else None
            if asked is None:
                self.unmatched.append(reply)
            else:
                asked.replies.append(reply)
                if reply.get("type") in ("final", "error"):
                    asked.done.set()
            self._changed.notify_all()

    def ask(self, request: dict[str, Any]) -> Asked:
        correlation = uuid.uuid4().bytes
        asked = Asked(correlation, request, self._changed)
        with self._changed:
            self.asked[correlation] = asked
        info = self.conn.publish(
            topics.device_infer_topic(DEVICE_ID),
            json.dumps(request),
            response_topic=self.reply_topic,
            correlation_data=correlation,
        )
        info.wait_for_publish(5)
        return asked

    def mark(self, name: str) -> str:
        """Publishes an empty message on a topic of its own and waits for the broker's PUBACK: a
        landmark in the broker's packet log (`BrokerLog.marker`) between what came before and after."""
        topic = f"{self.reply_topic}/mark/{name}"
        self.conn.publish(topic, b"").wait_for_publish(5)
        return topic

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Waits until `predicate` (called under the app's lock) holds; it is re-checked on every message."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise AssertionError(f"not within {timeout}s: {what}")

    def last_worker(self) -> str | None:
        with self._changed:
            return self.segment_replies[-1].worker if self.segment_replies else None

    def workers_seen(self, since: float = 0.0) -> list[str | None]:
        with self._changed:
            return [r.worker for r in self.segment_replies if r.at >= since]

    def round_trips(self) -> list[float]:
        """Seconds from each segment attempt to its first reply, as the app saw both."""
        with self._changed:
            sent = {r.correlation: r.at for r in self.segment_requests if r.correlation is not None}
            seen: dict[bytes, float] = {}
            for reply in self.segment_replies:
                if reply.correlation in sent and reply.correlation not in seen:
                    seen[reply.correlation] = reply.at - sent[reply.correlation]
        return list(seen.values())

    def wait_status(self, topic: str, state: str, timeout: float, procs: list[Proc]) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._changed.wait_for(lambda: self.status.get(topic) == state, 0.1):
                for proc in procs:
                    if not proc.alive():
                        raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{topic} not {state!r} within {timeout}s (now {self.status.get(topic)!r})")


def _correlation(msg: mqtt.MQTTMessage) -> bytes | None:
    correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
    return bytes(correlation) if correlation is not None else None


def summary(seconds: list[float]) -> str:
    if not seconds:
        return "none"
    q = sorted(seconds)
    return (
        f"n={len(q)} median={statistics.median(q) * 1e3:.0f}ms "
        f"p90={q[int(0.9 * (len(q) - 1))] * 1e3:.0f}ms max={q[-1] * 1e3:.0f}ms"
    )


_PUBLISH = re.compile(
    r"^\d+: (?P<way>Received|Sending) PUBLISH (?:from|to) (?P<client>\S+) "
    r"\(d\d, q\d, r\d, m\d+, '(?P<topic>[^']*)', \.\.\. \((?P<size>\d+) bytes\)\)$"
)


@dataclass(frozen=True)
class Publish:
    """One PUBLISH packet in the broker's log: `incoming` from `client`, or outgoing to it."""

    index: int  # its place among the log's PUBLISH packets: the order the broker handled them
    incoming: bool
    client: str
    topic: str
    size: int


class BrokerLog:
    """The PUBLISH packets of a broker that logs them (``log_type debug``), in the broker's order.

    mosquitto routes each incoming PUBLISH to every subscription before it reads the next packet,
    so the `Sending` lines of one message follow its `Received` line; a shared subscription's
    choice is the one `splitwise-cloud-*` client it was sent to."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def publishes(self) -> list[Publish]:
        found: list[Publish] = []
        for line in self.path.read_text(errors="replace").splitlines():
            if (m := _PUBLISH.match(line)) is not None:
                found.append(Publish(len(found), m["way"] == "Received", m["client"], m["topic"], int(m["size"])))
        return found

    def marker(self, topic: str, timeout: float = 10.0) -> int:
        """The index of the app's marker (`App.mark`) published on `topic`."""
        return self.wait(lambda ps: next((p.index for p in ps if p.incoming and p.topic == topic), None), timeout)

    def wait(self, find: Callable[[list[Publish]], T | None], timeout: float = 10.0) -> T:
        """Re-reads the log until `find` returns something (mosquitto writes each line as it goes)."""
        deadline = time.monotonic() + timeout
        while (found := find(self.publishes())) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"not in the broker log {self.path} within {timeout}s (log_type debug?)")
            time.sleep(0.02)
        return found


class System:
    """Broker + the processes one test starts; `close()` stops exactly those."""

    def __init__(self, broker: MosquittoBroker, workdir: Path) -> None:
        self.broker = broker
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.proxies: list[LinkProxy] = []
        self.workers: dict[str, Proc] = {}
        self.agent: Proc | None = None
        self.broker_log = BrokerLog(broker.log)
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
            self.app.wait_status(topics.worker_status_topic(worker_id), "online", 60, [proc])
        return proc

    def wait_workers(self, timeout: float = 60.0) -> None:
        for worker_id, proc in self.workers.items():
            self.app.wait_status(topics.worker_status_topic(worker_id), "online", timeout, [proc])

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
        self.app.wait_status(topics.device_status_topic(DEVICE_ID), "online", 60, [proc])
        return proc

    def serving_worker(self, timeout: float = 10.0) -> str:
        """The worker that answered the newest segment reply."""
        self.app.wait_for(lambda: self.app.last_worker() is not None, timeout, "a worker reply on the device's topic")
        worker = self.app.last_worker()
        assert worker is not None
        return worker

    def pause_worker(self, worker_id: str, timeout: float = 5.0) -> None:
        """SIGSTOP, and wait until every thread of the worker is stopped (state T in /proc)."""
        proc = self.workers[worker_id]
        proc.pause()
        tasks = Path(f"/proc/{proc.pid}/task")
        deadline = time.monotonic() + timeout
        while not all(_stopped(task) for task in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{proc.name} not stopped {timeout}s after SIGSTOP")
            time.sleep(0.005)

    def probe_pool(self) -> str:
        """Publishes a junk frame on the pool topic and reads in the broker's log which worker the
        shared subscription handed it to (it need not answer: a hung one cannot). Moves the pool's
        round robin by one. Needs `logged_system`."""
        topic, me = topics.pool_segment_topic(POOL), self.app.conn.client_id
        before = len(self.broker_log.publishes())
        self.app.conn.publish(topic, PROBE_FRAME).wait_for_publish(5)

        def handed_to(publishes: list[Publish]) -> str | None:
            on_pool = [p for p in publishes[before:] if p.topic == topic and p.size == len(PROBE_FRAME)]
            ours = next((i for i, p in enumerate(on_pool) if p.incoming and p.client == me), None)
            if ours is None:
                return None
            to_workers = (p for p in on_pool[ours + 1 :] if not p.incoming and p.client.startswith(WORKER_CLIENT))
            return next((p.client.removeprefix(WORKER_CLIENT) for p in to_workers), None)

        return self.broker_log.wait(handed_to)

    def logs(self) -> str:
        procs = "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.tail(40)}" for p in self.procs)
        return f"{procs}\n--- segment round trips seen by the app: {summary(self.app.round_trips())}"

    def close(self) -> None:
        # The agent first (it drains), then the workers; every proxy; only what this test started.
        for proc in sorted(self.procs, key=lambda p: p is not self.agent):
            proc.stop()
        for proxy in self.proxies:
            proxy.stop()
        self.app.stop()


def _stopped(task: Path) -> bool:
    try:
        stat = (task / "stat").read_text()
    except OSError:  # the thread has exited
        return True
    return stat[stat.rindex(")") + 2] in "Tt"


@contextmanager
def _running(broker: MosquittoBroker, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[System]:
    sys_ = System(broker, tmp_path)
    try:
        yield sys_
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(sys_.logs())
        sys_.close()


@pytest.fixture
def system(mosquitto_broker: MosquittoBroker, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[System]:
    with _running(mosquitto_broker, tmp_path, request) as sys_:
        yield sys_


@pytest.fixture
def logged_system(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[System]:
    """A `System` whose broker logs every PUBLISH packet (`System.broker_log`)."""
    broker = MosquittoBroker(tmp_path, log_types=("debug",))
    broker.start()
    try:
        with _running(broker, tmp_path, request) as sys_:
            yield sys_
    finally:
        broker.stop()


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


__all__ = ["App", "Asked", "BrokerLog", "Proc", "Publish", "System"]
