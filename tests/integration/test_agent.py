"""The device agent over a real broker: IoT apps built from the mosquitto command-line clients,
MQTT v5 request/response, bad input of every kind, a full queue — and the service keeps serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_offload.mqtt import BrokerSettings, MqttConnection, RpcClient
from cloud_offload.protocol import frames, topics
from cloud_offload.worker import CloudWorker
from splitwise_core.engine import model_sha256
from splitwise_core.ops import Op, OpKind
from splitwise_core.tokenizer import bundled_model_path
from splitwise_device.agent import DeviceAgent
from splitwise_device.config import load_device_config
from tests.integration.test_mqtt import subscriptions_settled

pytestmark = pytest.mark.broker
DEVICE = "dev-test"
POOL = "agenttest"


def write_config(tmp_path: Path, broker, **agent: Any) -> Path:  # type: ignore[no-untyped-def]
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in agent.items())
    path = tmp_path / "device.toml"
    path.write_text(
        f'[device]\nid = "{DEVICE}"\nmodel = "{bundled_model_path()}"\nthreads = 1\nstate_dir = "{tmp_path}"\n\n'
        f'[broker]\nurl = "{broker.url}"\n\n[agent]\ncodec = "f32"\n{extra}\n'
        f'[cloud]\npool = "{POOL}"\nsegment_timeout_s = 5\n'
    )
    return path


@pytest.fixture
def agent(tmp_path: Path, mosquitto_broker) -> Iterator[DeviceAgent]:  # type: ignore[no-untyped-def]
    a = DeviceAgent(load_device_config(write_config(tmp_path, mosquitto_broker, queue_size=2)))
    a.start()
    subscriptions_settled(a.connection)  # its request topic
    yield a
    a.drain(timeout=5)
    a.stop()


@pytest.fixture
def app(mosquitto_broker) -> Iterator[MqttConnection]:  # type: ignore[no-untyped-def]
    conn = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port), f"app-{uuid.uuid4().hex[:6]}")
    conn.start()
    yield conn
    conn.stop()


def ask(app: MqttConnection, payload: bytes | str, timeout: float = 60) -> list[dict[str, Any]]:
    """Sends one infer request (MQTT v5 ResponseTopic + CorrelationData); returns every reply up to
    the final one (or the error), each checked to carry the request's CorrelationData."""
    rpc_topic = f"app/{uuid.uuid4().hex}"
    # The handler only records (MqttConnection logs a handler's exception and goes on, so an assert
    # in there could only show up as a timeout); the checks run here, in the test's thread.
    received: list[tuple[bytes | None, bytes]] = []
    done = threading.Event()
    correlation = uuid.uuid4().bytes

    def on_reply(msg: mqtt.MQTTMessage) -> None:
        received.append((getattr(msg.properties, "CorrelationData", None), bytes(msg.payload)))
        try:
            last = json.loads(msg.payload)["type"] in ("final", "error")
        except (ValueError, TypeError, KeyError):
            last = True  # not a reply at all: stop waiting and let the checks below say so
        if last:
            done.set()

    app.subscribe(rpc_topic, on_reply, wait_s=5)
    app.publish(topics.device_infer_topic(DEVICE), payload, response_topic=rpc_topic, correlation_data=correlation)
    finished = done.wait(timeout)
    app.unsubscribe(rpc_topic)
    got = list(received)
    assert finished, f"no final reply within {timeout:g} s; got {[body for _, body in got]}"
    for got_correlation, body in got:
        assert got_correlation == correlation, (
            f"reply carries CorrelationData {got_correlation!r}, the request sent {correlation!r}: {body[:200]!r}"
        )
    return [json.loads(body) for _, body in got]


def mosquitto_client(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (apt-get install mosquitto-clients)"
    return path


def test_mosquitto_command_line_clients_get_answers(agent: DeviceAgent, mosquitto_broker) -> None:  # type: ignore[no-untyped-def]
    port = str(mosquitto_broker.port)
    # MQTT 3.1.1 app: no ResponseTopic, so it names its reply topic in the request.
    reply_topic = f"iot/app/{uuid.uuid4().hex[:6]}"
    sub = subprocess.Popen(
        [mosquitto_client("mosquitto_sub"), "-p", port, "-t", reply_topic, "-C", "1", "-W", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    request = {"prompt": "The capital of France is", "max_tokens": 6, "reply_to": reply_topic}
    subprocess.run(
        [
            mosquitto_client("mosquitto_pub"),
            "-p",
            port,
            "-t",
            topics.device_infer_topic(DEVICE),
            "-m",
            json.dumps(request),
        ],
        check=True,
    )
    out, _ = sub.communicate(timeout=90)
    reply = json.loads(out)
    assert reply["type"] == "final" and reply["tokens"]["completion"] == 6 and reply["text"]

    # MQTT v5 app: ResponseTopic and CorrelationData as properties.
    v5_topic = f"iot/v5/{uuid.uuid4().hex[:6]}"
    sub = subprocess.Popen(
        [
            mosquitto_client("mosquitto_sub"),
            "-V",
            "mqttv5",
            "-p",
            port,
            "-t",
            v5_topic,
            "-C",
            "1",
            "-W",
            "60",
            "-F",
            "%j",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    subprocess.run(
        [
            mosquitto_client("mosquitto_pub"),
            "-V",
            "mqttv5",
            "-p",
            port,
            "-t",
            topics.device_infer_topic(DEVICE),
            "-D",
            "publish",
            "response-topic",
            v5_topic,
            "-D",
            "publish",
            "correlation-data",
            "req-42",
            "-m",
            json.dumps({"prompt": "Hello", "max_tokens": 3}),
        ],
        check=True,
    )
    out, _ = sub.communicate(timeout=90)
    envelope = json.loads(out)
    assert envelope["properties"]["correlation-data"] == "req-42"
    assert json.loads(envelope["payload"])["type"] == "final"


def test_streaming_and_chat_messages(agent: DeviceAgent, app: MqttConnection) -> None:
    replies = ask(
        app,
        json.dumps(
            {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 10, "stream": True, "request_id": "r1"}
        ),
    )
    chunks, final = replies[:-1], replies[-1]
    assert final["type"] == "final" and final["request_id"] == "r1"
    assert chunks and all(c["type"] == "chunk" and c["request_id"] == "r1" for c in chunks)
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert final["plan"]["name"] == "edge-only" and final["timings"]["total_s"] > 0


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "json"),
        (b'{"prompt": 42}', "prompt"),
        (b'{"max_tokens": 5}', "exactly one of prompt or messages"),
        (json.dumps({"prompt": "x" * 40000}).encode(), "longer than"),
        (b'{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": 99999}', "max_tokens"),
        (b'{"prompt": "hi", "temperature": "hot"}', "temperature"),
        (b'{"prompt": "hi", "unknown": 1}', "unknown"),
        (b'{"prompt": "\xff\xfe bad utf8"}', ""),
        (bytes(range(256)), ""),
        (b'{"prompt": "hi", "plan": "layer-split:99"}', "layer"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "role"),
    ],
)
def test_bad_requests_get_error_replies_and_the_agent_keeps_serving(
    agent: DeviceAgent, app: MqttConnection, payload: bytes, fragment: str
) -> None:
    replies = ask(app, payload)
    assert len(replies) == 1 and replies[0]["type"] == "error"
    assert replies[0]["error"]["code"] == "bad_request"
    assert fragment.lower() in replies[0]["error"]["message"].lower()
    ok = ask(app, json.dumps({"prompt": "Hello", "max_tokens": 2}))
    assert ok[-1]["type"] == "final"


def test_full_queue_answers_overloaded(agent: DeviceAgent, app: MqttConnection) -> None:
    topic = f"app/{uuid.uuid4().hex}"
    received: list[tuple[bytes | None, bytes]] = []
    all_answered = threading.Event()

    def on_reply(msg: mqtt.MQTTMessage) -> None:
        received.append((getattr(msg.properties, "CorrelationData", None), bytes(msg.payload)))
        if len(received) >= 6:
            all_answered.set()

    app.subscribe(topic, on_reply, wait_s=5)
    for i in range(6):  # one runs, two wait (queue_size=2), the rest are refused
        app.publish(
            topics.device_infer_topic(DEVICE),
            json.dumps({"prompt": "Count to ten:", "max_tokens": 24, "request_id": str(i)}),
            response_topic=topic,
            correlation_data=b"c",
        )
    all_answered.wait(120)
    assert all(correlation == b"c" for correlation, _ in received), received
    replies = [json.loads(body) for _, body in received]
    kinds = sorted(r["type"] if r["type"] == "final" else r["error"]["code"] for r in replies)
    assert len(replies) == 6, replies  # every request answered exactly once: nothing lost
    # Two fit the queue; a third may already have left it for the serving thread.
    assert kinds.count("overloaded") >= 3 and kinds.count("final") in (2, 3), kinds
    assert sorted(r["request_id"] for r in replies) == [str(i) for i in range(6)]


@contextmanager
def worker_and_edge(
    broker, worker_id: str, pool: str, **options: Any
) -> Iterator[tuple[CloudWorker, RpcClient, bytes]]:  # type: ignore[no-untyped-def]
    """An in-process worker and an edge-side request client on `broker`, stopped afterwards."""
    settings = BrokerSettings(broker.host, broker.port)
    worker = CloudWorker(bundled_model_path(), worker_id=worker_id, pool=pool, broker=settings, **options)
    worker.start()
    conn = MqttConnection(settings, f"edge-{worker_id}")
    conn.start()
    try:
        rpc = RpcClient(conn, f"edge/reply/{uuid.uuid4().hex}")
        subscriptions_settled(conn)  # the reply topic
        subscriptions_settled(worker.connection)  # the pool and worker topics
        yield worker, rpc, frames.model_hash_prefix(model_sha256(bundled_model_path()))
    finally:
        conn.stop()
        worker.stop()


def test_worker_rejects_bad_frames_and_keeps_serving(mosquitto_broker) -> None:  # type: ignore[no-untyped-def]
    with worker_and_edge(mosquitto_broker, "wbad", POOL) as (worker, rpc, model_hash):
        conn = rpc.connection
        session = uuid.uuid4()
        import numpy as np

        x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
        good = frames.encode_request(
            session=session,
            step=0,
            position=0,
            segment=0,
            model_hash=model_hash,
            ops=[Op(OpKind.FFN, 3)],
            tensor=x,
            codec="f32",
        )
        bad_crc = bytearray(good)
        bad_crc[-1] ^= 0xFF
        other_model = frames.encode_request(
            session=session,
            step=0,
            position=0,
            segment=0,
            model_hash=bytes(16),
            ops=[Op(OpKind.FFN, 3)],
            tensor=x,
            codec="f32",
        )
        # Attention at position 5 for a session this worker never saw: the KV history is missing.
        out_of_order = frames.encode_request(
            session=uuid.uuid4(),
            step=5,
            position=5,
            segment=0,
            model_hash=model_hash,
            ops=[Op(OpKind.ATTN_PART, 0, (0, 1))],
            tensor=x,
            codec="f32",
        )
        topic = topics.pool_segment_topic(POOL)

        def error_code(payload: bytes) -> str:
            frame = frames.decode_frame(rpc.request(topic, payload)[1].result(timeout=10).payload)
            assert frame.kind is frames.FrameKind.ERROR
            return frame.error()[0]

        assert error_code(bytes(range(200))) == "bad_frame"
        assert error_code(bytes(bad_crc)) == "bad_frame"
        assert error_code(other_model) == "model_mismatch"
        assert error_code(out_of_order) == "unknown_session"
        first = rpc.request(topic, good)[1].result(timeout=10).payload
        replay = rpc.request(topic, good)[1].result(timeout=10).payload  # a redelivery: answered from memory
        assert frames.decode_frame(first).kind is frames.FrameKind.RESPONSE and replay == first
        assert worker.stats.duplicates == 1
        conn.publish(topic, b"no reply topic at all")  # logged and dropped
        again = frames.decode_frame(
            rpc.request(
                topic,
                frames.encode_request(
                    session=uuid.uuid4(),
                    step=0,
                    position=0,
                    segment=0,
                    model_hash=model_hash,
                    ops=[Op(OpKind.FFN, 1)],
                    tensor=x,
                    codec="q8_0",
                ),
            )[1]
            .result(timeout=10)
            .payload
        )
        assert again.kind is frames.FrameKind.RESPONSE and again.tensor().shape == (1, 576)


def test_worker_sessions_expire_and_respect_the_memory_cap(mosquitto_broker) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    with worker_and_edge(mosquitto_broker, "wttl", "ttl", session_ttl_s=0.5, kv_memory_cap=1) as (
        worker,
        rpc,
        model_hash,
    ):
        x = np.random.default_rng(1).standard_normal((1, 576)).astype(np.float32)
        for _ in range(3):  # three sessions with KV; a 1-byte cap keeps only the newest
            frame = frames.encode_request(
                session=uuid.uuid4(),
                step=0,
                position=0,
                segment=0,
                model_hash=model_hash,
                ops=[Op(OpKind.LAYER, 0)],
                tensor=x,
                codec="f32",
            )
            rpc.request(topics.pool_segment_topic("ttl"), frame)[1].result(timeout=10)
        assert len(worker.sessions) == 1 and worker.stats.sessions_evicted == 2
        deadline = time.monotonic() + 10
        while worker.sessions and time.monotonic() < deadline:  # idle: the TTL still frees it
            time.sleep(0.1)
        assert not worker.sessions and worker.stats.sessions_evicted == 3
