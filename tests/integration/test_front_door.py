"""The agent's front door under hostile input: odd reply topics (MQTT v5 ResponseTopic and
``reply_to``), deeply nested and oversized JSON, failures while serving, malformed inline plans,
readiness only once the broker is connected, and the connection-state log. Every test checks
that the agent still answers the next ordinary request and did not lose its broker connection."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_offload.local_broker import LocalBroker
from cloud_offload.mqtt import BrokerSettings, MqttConnection
from cloud_offload.protocol import topics
from splitwise_device import agent as agent_module
from splitwise_device import app_messages
from splitwise_device.agent import DeviceAgent
from splitwise_device.config import load_device_config
from tests.integration.test_agent import DEVICE, ask, write_config
from tests.integration.test_mqtt import subscriptions_settled

pytestmark = pytest.mark.broker
INFER = topics.device_infer_topic(DEVICE)
HELLO = json.dumps({"prompt": "Hello", "max_tokens": 2})


class Disconnects:
    """Counts the agent's broker disconnects (a malformed PUBLISH makes mosquitto drop it)."""

    def __init__(self, connection: MqttConnection) -> None:
        self.count = 0
        original = connection.client.on_disconnect

        def counted(*args: Any) -> None:
            self.count += 1
            original(*args)

        connection.client.on_disconnect = counted


def start_agent(tmp_path: Path, broker: LocalBroker, **agent: Any) -> DeviceAgent:
    a = DeviceAgent(load_device_config(write_config(tmp_path, broker, **agent)))
    a.start()
    subscriptions_settled(a.connection)
    return a


@pytest.fixture
def front(tmp_path: Path, mosquitto_broker: LocalBroker) -> Iterator[tuple[DeviceAgent, Disconnects]]:
    a = start_agent(tmp_path, mosquitto_broker, queue_size=2)
    disconnects = Disconnects(a.connection)
    yield a, disconnects
    a.drain(timeout=5)
    a.stop()


@pytest.fixture
def app(mosquitto_broker: LocalBroker) -> Iterator[MqttConnection]:
    conn = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port), f"app-{uuid.uuid4().hex[:6]}")
    conn.start()
    yield conn
    conn.stop()


def message(payload: bytes | str, response_topic: str | None = None, correlation: bytes | None = None) -> Any:
    """An MQTTMessage as paho hands it to the agent, with properties no broker would forward."""
    msg = mqtt.MQTTMessage(topic=INFER.encode())
    msg.payload = payload.encode() if isinstance(payload, str) else payload
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    msg.properties = props
    return msg


def still_serving(a: DeviceAgent, app: MqttConnection, disconnects: Disconnects) -> None:
    assert ask(app, HELLO, timeout=60)[-1]["type"] == "final"
    assert a._worker.is_alive(), "the requests thread died"
    assert disconnects.count == 0 and a.connection.connected.is_set(), "the broker dropped the agent"


def collect(app: MqttConnection, topic: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    app.subscribe(topic, lambda m: got.append(json.loads(m.payload)), wait_s=5)
    return got


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


# --- defect 1: a wildcard ResponseTopic -------------------------------------------------------


def test_wildcard_response_topic_neither_kills_the_requests_thread_nor_goes_unanswered(
    front: tuple[DeviceAgent, Disconnects], app: MqttConnection, caplog: pytest.LogCaptureFixture
) -> None:
    a, disconnects = front
    # mosquitto forwards a ResponseTopic with wildcards as it is.
    for bad in ("x/#", "x/+/y", "$SYS/x"):
        app.publish(INFER, HELLO, response_topic=bad, correlation_data=b"c")
    still_serving(a, app, disconnects)
    # Invalid ResponseTopic, valid reply_to: the error goes to reply_to.
    fallback = f"app/fallback/{uuid.uuid4().hex[:6]}"
    got = collect(app, fallback)
    app.publish(INFER, json.dumps({"prompt": "Hi", "max_tokens": 2, "reply_to": fallback}), response_topic="x/#")
    assert wait_for(lambda: got), "no error reply on reply_to"
    assert got[0]["type"] == "error" and got[0]["error"]["code"] == "bad_request"
    assert "ResponseTopic" in got[0]["error"]["message"]
    still_serving(a, app, disconnects)
    dropped = [r for r in caplog.records if "ResponseTopic" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(dropped) == 3, [r.getMessage() for r in dropped]  # one line per dropped request


# --- defect 2: control characters in reply topics ---------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"prompt": "Hi", "max_tokens": 2, "reply_to": "x/line\n"},
        {"prompt": 1, "reply_to": "a\u0000b"},
        {"prompt": "Hi", "reply_to": "a\u0001b"},
        {"prompt": "Hi", "reply_to": "a\u0085b"},
        {"prompt": "Hi", "reply_to": "a\ufffeb"},
        {"prompt": "Hi", "reply_to": "a/#"},
        {"prompt": "Hi", "reply_to": "$SYS/x"},
        {"prompt": "Hi", "reply_to": "x" * 65536},
        {"prompt": "Hi", "reply_to": ""},
        {"prompt": "Hi", "reply_to": 7},
    ],
    ids=["newline", "nul-invalid-request", "u0001", "c1", "ufffe", "wildcard", "dollar", "too-long", "empty", "int"],
)
def test_invalid_reply_to_is_never_published_to(
    front: tuple[DeviceAgent, Disconnects],
    app: MqttConnection,
    payload: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, disconnects = front
    app.publish(INFER, json.dumps(payload))
    # The same request from a broker that forwards control characters in a ResponseTopic.
    a._on_infer(message(json.dumps({"prompt": "Hi", "max_tokens": 2}), response_topic="x/line\n"))
    time.sleep(1.5)  # mosquitto would drop the agent within a keepalive round trip
    still_serving(a, app, disconnects)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == agent_module.__name__]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one line per dropped request


def test_invalid_reply_to_with_a_valid_response_topic_gets_bad_request(
    front: tuple[DeviceAgent, Disconnects], app: MqttConnection
) -> None:
    a, disconnects = front
    replies = ask(app, json.dumps({"prompt": "Hi", "reply_to": "x/line\n"}))
    assert replies[-1]["type"] == "error" and replies[-1]["error"]["code"] == "bad_request"
    assert "reply_to" in replies[-1]["error"]["message"]
    still_serving(a, app, disconnects)


def test_send_never_raises(front: tuple[DeviceAgent, Disconnects], caplog: pytest.LogCaptureFixture) -> None:
    a, _ = front
    reply = agent_module.ReplyPath("x/#", None)
    a._send(reply, app_messages.error_reply("internal", "x"))  # logged and dropped
    assert any("x/#" in r.getMessage() for r in caplog.records)


# --- defect 3: deep and huge JSON ----------------------------------------------------------------


@pytest.mark.parametrize("depth", [33, 1000, 100_000, 1_000_000])
def test_deeply_nested_json_is_refused_before_parsing(
    front: tuple[DeviceAgent, Disconnects],
    app: MqttConnection,
    depth: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, disconnects = front
    payloads = [b"[" * depth, b'{"a":' * depth + b"1" + b"}" * depth, b'{"prompt":"x","plan":' + b"[" * depth]
    for payload in payloads:
        replies = ask(app, payload, timeout=20)
        assert replies[-1]["type"] == "error" and replies[-1]["error"]["code"] == "bad_request"
        too_big = len(payload) > a.config.agent.max_request_bytes  # refused by size, before the scan
        assert ("exceeds" if too_big else "nested deeper than 32") in replies[-1]["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    still_serving(a, app, disconnects)


def test_nesting_at_the_limit_and_brackets_in_strings_are_fine(
    front: tuple[DeviceAgent, Disconnects], app: MqttConnection
) -> None:
    a, disconnects = front
    prompt = "[[[[{{{{" * 100 + '\\"[[[' + "]]]]" * 50
    replies = ask(app, json.dumps({"prompt": prompt, "max_tokens": 2}))
    assert replies[-1]["type"] == "final"
    # Depth 32 exactly: an invalid request, but refused by validation, not by depth.
    deep_ok = b'{"prompt":"x","plan":' + b"[" * 31 + b"]" * 31 + b"}"
    replies = ask(app, deep_ok)
    assert replies[-1]["error"]["code"] == "bad_request" and "nested" not in replies[-1]["error"]["message"]
    still_serving(a, app, disconnects)


def test_json_depth_scan() -> None:
    depth = agent_module.json_nesting_depth
    assert depth(b"") == 0 and depth(b'"[[["') == 0 and depth(b"1") == 0
    assert depth(b"[]") == 1 and depth(b'{"a":[{"b":[]}]}') == 4
    assert depth(b'["\\"[[", ["]"]]') == 2
    assert depth(b'"\\\\"[[') == 2  # an escaped backslash ends the string
    assert depth(b'"unterminated [[[[') == 0
    assert depth(b"[" * 1_000_000) == 1_000_000
    assert depth(b"]]][[") == 0  # invalid: the parser stops at the first ']'
    assert depth(b"[" * 40, stop_at=33) >= 33 and depth(b"[[", stop_at=33) == 2


def test_oversized_payload_is_refused_before_parsing(
    front: tuple[DeviceAgent, Disconnects], app: MqttConnection
) -> None:
    a, disconnects = front
    limit = a.config.agent.max_request_bytes
    replies = ask(app, b" " * (limit + 1), timeout=20)
    assert replies[-1]["error"]["code"] == "bad_request" and str(limit) in replies[-1]["error"]["message"]
    still_serving(a, app, disconnects)


def test_huge_correlation_data_is_echoed(front: tuple[DeviceAgent, Disconnects], app: MqttConnection) -> None:
    a, disconnects = front
    topic = f"app/{uuid.uuid4().hex}"
    got: list[bytes] = []
    app.subscribe(topic, lambda m: got.append(bytes(m.properties.CorrelationData)), wait_s=5)
    big = os.urandom(65535)  # the most MQTT's two-byte length allows
    app.publish(INFER, b"{bad", response_topic=topic, correlation_data=big)
    assert wait_for(lambda: got) and got[0] == big
    still_serving(a, app, disconnects)


# --- defect 6: failures while serving --------------------------------------------------------


def test_failing_publish_and_engine_end_only_that_request(
    front: tuple[DeviceAgent, Disconnects], app: MqttConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, disconnects = front
    real_publish = a.connection.publish
    failures = {"n": 0}

    def flaky_publish(topic: str, payload: Any, **kw: Any) -> Any:
        if topic.startswith("app/") and failures["n"] < 2:  # the final reply and the error reply
            failures["n"] += 1
            raise OSError("socket gone")
        return real_publish(topic, payload, **kw)

    monkeypatch.setattr(a.connection, "publish", flaky_publish)
    app.publish(INFER, HELLO, response_topic=f"app/{uuid.uuid4().hex}", correlation_data=b"c")
    assert wait_for(lambda: failures["n"] == 2 and not a.busy.is_set() and a.served == 1, 60)
    monkeypatch.setattr(a.connection, "publish", real_publish)

    def broken(*_args: Any, **_kw: Any) -> Any:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(a.executor, "generate", broken)
    replies = ask(app, HELLO)
    assert replies[-1]["error"]["code"] == "internal" and "engine exploded" in replies[-1]["error"]["message"]
    monkeypatch.undo()
    still_serving(a, app, disconnects)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit below
def test_a_dead_requests_thread_stops_the_watchdog(
    tmp_path: Path, mosquitto_broker: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tempfile.mkdtemp(prefix="sdn-")
    address = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    a = start_agent(tmp_path, mosquitto_broker)
    try:

        def pings(seconds: float) -> int:
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    n += sock.recv(4096).count(b"WATCHDOG=1")
            return n

        assert pings(1.0) >= 3
        monkeypatch.setattr(a, "_serve", lambda job: (_ for _ in ()).throw(SystemExit("killed for the test")))
        a.jobs.put(agent_module.Job(app_messages.InferRequest(prompt="x"), agent_module.ReplyPath("app/x", None), 0.0))
        assert wait_for(lambda: not a._worker.is_alive(), 10)
        pings(0.5)  # one may be on its way
        assert pings(1.0) == 0
    finally:
        a.drain(timeout=1)
        a.stop()
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- defect 7: inline plans checked at intake -------------------------------------------------


@pytest.mark.parametrize(
    "plan",
    [
        {"version": 1},
        {"nonsense": True},
        [],
        {"version": 1, "name": "x", "n_layer": 2, "n_head": 9, "layers": [], "lm_head": "edge"},
    ],
)
def test_malformed_inline_plan_is_refused_at_intake(
    front: tuple[DeviceAgent, Disconnects], app: MqttConnection, monkeypatch: pytest.MonkeyPatch, plan: Any
) -> None:
    a, disconnects = front
    release = threading.Event()
    real = a.executor.generate

    def blocked(*args: Any, **kw: Any) -> Any:
        release.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(a.executor, "generate", blocked)
    app.publish(INFER, HELLO, response_topic=f"app/{uuid.uuid4().hex}")  # occupies the requests thread
    assert wait_for(a.busy.is_set)
    try:
        replies = ask(app, json.dumps({"prompt": "Hi", "plan": plan}), timeout=5)
    finally:
        release.set()
    assert replies[-1]["type"] == "error" and replies[-1]["error"]["code"] == "bad_request"
    assert "plan" in replies[-1]["error"]["message"]
    assert a.jobs.qsize() == 0
    monkeypatch.undo()
    still_serving(a, app, disconnects)


# --- defect 5: READY only once connected; the connection log -----------------------------------


def test_ready_is_sent_only_after_the_broker_connects(
    tmp_path: Path, mosquitto_broker: LocalBroker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tempfile.mkdtemp(prefix="sdn-")
    address = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    caplog.set_level(logging.INFO)
    mosquitto_broker.stop()  # the broker is down when the agent starts
    a = DeviceAgent(load_device_config(write_config(tmp_path, mosquitto_broker)))
    try:
        a.start(connect_timeout=None)
        got: list[str] = []
        end = time.monotonic() + 4.5
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                got.append(sock.recv(4096).decode())
        assert not any("READY=1" in m for m in got), got
        failures = [
            r.getMessage() for r in caplog.records if "broker" in r.getMessage() and r.levelno >= logging.WARNING
        ]
        # Attempts at 0, 1, 3 s (paho's backoff); the first names the reason, then spaced reminders.
        assert failures and "connection refused" in failures[0].lower(), failures
        assert len(failures) <= 3, failures
        mosquitto_broker.start()  # mosquitto sends its own READY=1 to $NOTIFY_SOCKET too: not ours

        def ours(m: str) -> bool:
            return "READY=1" in m and f"STATUS=serving {INFER}" in m

        end = time.monotonic() + 30
        while time.monotonic() < end and not any(ours(m) for m in got):
            with contextlib.suppress(TimeoutError):
                got.append(sock.recv(4096).decode())
        assert any(ours(m) for m in got), got
        assert a.connection.connected.is_set()
        assert any("connected to" in r.getMessage() and "failed attempts" in r.getMessage() for r in caplog.records)
    finally:
        a.drain(timeout=1)
        a.stop()
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- limits: prompt tokens ------------------------------------------------------------------------


def test_a_prompt_over_max_prompt_tokens_is_refused_before_any_compute(
    tmp_path: Path, mosquitto_broker: LocalBroker, app: MqttConnection
) -> None:
    a = start_agent(tmp_path, mosquitto_broker, max_prompt_tokens=40)
    try:
        computed: list[int] = []
        original = a.executor.generate
        a.executor.generate = lambda *args, **kwargs: computed.append(1) or original(*args, **kwargs)  # type: ignore[method-assign]
        replies = ask(app, json.dumps({"prompt": "word " * 60, "max_tokens": 2}))
        assert replies[-1]["error"]["code"] == "bad_request", replies
        assert "accepts at most 40" in replies[-1]["error"]["message"], replies
        assert computed == []
        assert ask(app, json.dumps({"prompt": "Hi", "max_tokens": 1}))[-1]["type"] == "final"
        assert computed == [1]
    finally:
        a.drain(timeout=5)
        a.stop()
