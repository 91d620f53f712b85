"""Workers publish their cost profile (retained, per worker) and devices collect it: real broker,
real model. Also the `[worker] profile` setting and the `serve --profile` option."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from cloud_offload.config import load_cloud_config
from cloud_offload.mqtt import BrokerSettings, MqttConnection, RpcClient
from cloud_offload.profiles import WorkerProfiles, profile_message
from cloud_offload.protocol import frames, topics
from cloud_offload.worker import CloudWorker
from splitwise_core.engine import model_sha256
from splitwise_core.ops import Op, OpKind
from splitwise_core.profile import Profile
from splitwise_core.tokenizer import bundled_model_path
from tests.integration.test_mqtt import subscriptions_settled

pytestmark = pytest.mark.broker
POOL = "prof"
REPO = Path(__file__).resolve().parents[2]
PROFILE_FILE = REPO / "deploy" / "profiles" / "reference-vm.smollm2-135m.profile.json"
MODEL_HASH = frames.model_hash_prefix(model_sha256(bundled_model_path()))


@pytest.fixture
def connect(mosquitto_broker) -> Iterator:  # type: ignore[no-untyped-def, type-arg]
    conns: list[MqttConnection] = []

    def make() -> MqttConnection:
        conn = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port), f"d-{uuid.uuid4().hex[:6]}")
        conn.start()
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        conn.stop()


def settled_collector(conn: MqttConnection) -> WorkerProfiles:
    """A WorkerProfiles whose subscription the broker has acknowledged. The broker sends what it
    retains right after that SUBACK, so it has arrived too once `subscriptions_settled` returns."""
    collector = WorkerProfiles(conn, POOL, MODEL_HASH)
    subscriptions_settled(conn)
    return collector


def new_worker(broker, profile, worker_id: str = "w1", threads: int = 1) -> CloudWorker:  # type: ignore[no-untyped-def]
    return CloudWorker(
        bundled_model_path(),
        worker_id=worker_id,
        pool=POOL,
        broker=BrokerSettings(broker.host, broker.port),
        threads=threads,
        profile=profile,
    )


def test_file_profile_is_retained_for_late_subscribers_and_cleared_on_stop(mosquitto_broker, connect) -> None:  # type: ignore[no-untyped-def]
    worker = new_worker(mosquitto_broker, PROFILE_FILE)
    worker.start()
    try:
        assert worker.profile_done.wait(5)
        # The whole message, as a raw subscriber sees it. Once it arrived the broker holds it, so
        # whoever subscribes after this gets it only because it is retained.
        raw: list[bytes] = []
        arrived = threading.Event()

        def on_raw(msg: mqtt.MQTTMessage) -> None:
            raw.append(bytes(msg.payload))
            arrived.set()

        connect().subscribe(topics.worker_profile_topic(POOL, "w1"), on_raw, wait_s=5)
        assert arrived.wait(5), "no profile message"
        msg = json.loads(raw[0])
        assert set(msg) == {"worker_id", "pool", "model_hash", "threads", "measured_at", "source", "profile"}
        assert (msg["worker_id"], msg["pool"], msg["model_hash"]) == ("w1", POOL, MODEL_HASH.hex())
        late = WorkerProfiles(connect(), POOL, MODEL_HASH)  # subscribes after the publish: retained
        assert late.wait_for_any(5)
        assert late.profiles() == {"w1": json.loads(PROFILE_FILE.read_text())}
        entry = late.entries()["w1"]
        assert entry.threads == 1 and entry.source == "file" and entry.measured_at.endswith("+00:00")
        assert Profile.from_json(json.dumps(late.profiles()["w1"])).threads >= 1
    finally:
        worker.stop()
    # The live subscriber drops the worker; a new subscriber gets nothing retained.
    deadline = time.monotonic() + 5
    while late.profiles() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert late.profiles() == {}
    after = settled_collector(connect())
    assert not after.wait_for_any(1.0)


def segment_request() -> bytes:
    """A real segment: one FFN on a fresh session's first position."""
    x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
    return frames.encode_request(
        session=uuid.uuid4(),
        step=0,
        position=0,
        segment=0,
        model_hash=MODEL_HASH,
        ops=[Op(OpKind.FFN, 3)],
        tensor=x,
        codec="f32",
    )


def test_measured_profile_is_a_planner_profile(mosquitto_broker, connect) -> None:  # type: ignore[no-untyped-def]
    profiles = settled_collector(connect())
    edge = connect()
    rpc = RpcClient(edge, f"edge/reply/{uuid.uuid4().hex}")
    subscriptions_settled(edge)
    worker = new_worker(mosquitto_broker, "measure", worker_id="wm", threads=1)
    started = time.monotonic()
    worker.start()
    try:
        # The worker serves while it profiles: a real segment is answered before the profile is out.
        subscriptions_settled(worker.connection)
        at_reply: dict[str, object] = {}
        _, future = rpc.request(topics.worker_segment_topic("wm"), segment_request())
        future.add_done_callback(
            lambda _f: at_reply.update(profile_done=worker.profile_done.is_set(), collected=sorted(profiles.profiles()))
        )
        reply = frames.decode_frame(future.result(timeout=120).payload)
        answered = time.monotonic() - started
        assert reply.kind is frames.FrameKind.RESPONSE and reply.tensor().shape == (1, 576)
        assert at_reply == {"profile_done": False, "collected": []}, (
            f"the worker answered its first segment ({answered:.1f} s after start) only once its profile "
            f"was out: {at_reply}"
        )
        assert profiles.wait_for_any(120), "no profile within 120 s"
        elapsed = time.monotonic() - started
        entry = profiles.entries()["wm"]
        profile = Profile.from_json(json.dumps(entry.profile))
        assert profile.threads == 1 and entry.threads == 1 and entry.source == "measured"
        assert profile.model.startswith(bundled_model_path().name)
        assert MODEL_HASH.hex() in profile.note or model_sha256(bundled_model_path()).hex()[:16] in profile.model
        assert worker.profile_seconds is not None
        print(f"\nmeasured worker profile: {worker.profile_seconds:.1f} s profiling, {elapsed:.1f} s to arrive; "
              f"a segment answered {answered * 1e3:.0f} ms after start")  # fmt: skip
    finally:
        worker.stop()


def test_invalid_profile_messages_are_ignored(mosquitto_broker, connect) -> None:  # type: ignore[no-untyped-def]
    collector = settled_collector(connect())
    pub = connect()
    good = json.loads(PROFILE_FILE.read_text())

    def message(worker_id: str, **changes: object) -> bytes:
        msg = json.loads(
            profile_message(worker_id=worker_id, pool=POOL, model_hash=MODEL_HASH, threads=2, profile=good)
        )
        msg.update(changes)
        return json.dumps(msg).encode()

    bad = [
        ("wa", message("wa", model_hash=(b"\x01" * 16).hex())),  # another model
        ("wb", b"{not json"),
        ("wc", message("someone-else")),  # worker id does not match the topic
        ("wd", b"[1, 2]"),
        ("we", message("we", profile={"machine": "x"})),  # not a profile
        ("wf", message("wf", threads=0)),
        ("wg", b"\xff\xfe"),
    ]
    for wid, payload in bad:
        pub.publish(topics.worker_profile_topic(POOL, wid), payload).wait_for_publish(2)
    pub.publish(f"splitwise/v1/cloud/{POOL}/profile/not.an.id", message("x")).wait_for_publish(2)
    pub.publish(topics.worker_profile_topic(POOL, "ok"), message("ok")).wait_for_publish(2)
    assert collector.wait_for_any(5)
    deadline = time.monotonic() + 5
    while collector.ignored < len(bad) + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert collector.ignored == len(bad) + 1
    assert collector.profiles() == {"ok": good}
    # Still working: another worker arrives, then withdraws; a bad message does not remove "ok".
    pub.publish(topics.worker_profile_topic(POOL, "ok2"), message("ok2")).wait_for_publish(2)
    pub.publish(topics.worker_profile_topic(POOL, "ok"), b"{").wait_for_publish(2)
    deadline = time.monotonic() + 5
    while len(collector.profiles()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(collector.profiles()) == {"ok", "ok2"}
    pub.publish(topics.worker_profile_topic(POOL, "ok2"), b"").wait_for_publish(2)
    deadline = time.monotonic() + 5
    while "ok2" in collector.profiles() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(collector.profiles()) == {"ok"}
    # A full SHA-256 digest is accepted as our model hash too.
    assert WorkerProfiles(pub, POOL, model_sha256(bundled_model_path())).model_hash == MODEL_HASH


def test_off_publishes_nothing(mosquitto_broker, connect) -> None:  # type: ignore[no-untyped-def]
    worker = new_worker(mosquitto_broker, "off", worker_id="woff")
    worker.start()
    try:
        collector = settled_collector(connect())
        assert not collector.wait_for_any(0.5)
    finally:
        worker.stop()


# --- configuration and command line (no broker needed) ----------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cloud.toml"
    path.write_text('[worker]\nid = "w1"\nmodel = "model.gguf"\n' + text)
    return path


def test_profile_setting(tmp_path: Path) -> None:
    assert load_cloud_config(write(tmp_path, "")).worker.profile == "measure"
    assert load_cloud_config(write(tmp_path, 'profile = "off"\n')).worker.profile == "off"
    config = load_cloud_config(write(tmp_path, 'profile = "p.json"\n'))
    assert config.worker.profile == tmp_path / "p.json"
    assert config.profile_problems() == [f"worker.profile: {tmp_path / 'p.json'} does not exist"]
    (tmp_path / "p.json").write_text("[1]")
    assert config.profile_problems() == [f"worker.profile: {tmp_path / 'p.json'}: a profile is a JSON object, got list"]
    (tmp_path / "p.json").write_text("{oops")
    assert "is not valid JSON" in config.profile_problems()[0]
    (tmp_path / "p.json").write_text('{"machine": "m"}')
    assert "not a profile: model: Field required" in config.profile_problems()[0]
    (tmp_path / "p.json").write_text(PROFILE_FILE.read_text())
    assert config.profile_problems() == []
    assert config.check_files() == [f"worker.model: {tmp_path / 'model.gguf'} does not exist"]
    (tmp_path / "p.json").write_text("[1]")
    assert config.check_files()[1:] == [f"worker.profile: {tmp_path / 'p.json'}: a profile is a JSON object, got list"]
    from splitwise_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"worker\.profile: expected 'measure', 'off' or the path"):
        load_cloud_config(write(tmp_path, "profile = 3\n"))


def test_serve_rejects_a_bad_profile_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cloud_offload.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    config = write(tmp_path, f'profile = "{bad}"\n')
    assert main(["serve", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}: worker.profile: {bad}: a profile is a JSON object, got list" in err
    # The option overrides the file's setting, with the same check.
    ok = write(tmp_path, "")
    assert main(["serve", "--config", str(ok), "--profile", str(bad)]) == 1
    assert "worker.profile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--broker", "mqtt://127.0.0.1:1", "--model", str(bundled_model_path()), "--profile", str(bad)])
    assert info.value.code == 2
    assert f"--profile {bad}: {bad}: a profile is a JSON object" in capsys.readouterr().err


def test_stop_while_measuring_publishes_nothing(mosquitto_broker, connect) -> None:  # type: ignore[no-untyped-def]
    worker = new_worker(mosquitto_broker, "measure", worker_id="wq")
    worker.start()
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 5
    assert worker.profile_done.wait(10)  # the profiler noticed the stop and gave up
    assert worker.profile_seconds is None
    assert not settled_collector(connect()).wait_for_any(1.0)
