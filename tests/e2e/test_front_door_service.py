"""The services as processes during a broker outage: SIGTERM exits 0 without a traceback (systemd
must not mark the unit failed), READY waits for the broker, the connection log stays readable,
and ``check-config --connect`` reports whether the broker answers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_offload.local_broker import LocalBroker, free_port
from splitwise_core.tokenizer import bundled_model_path

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def device_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "device.toml"
    path.write_text(
        f'[device]\nid = "fd-dev"\nmodel = "{bundled_model_path()}"\nthreads = 1\nstate_dir = "{tmp_path}"\n\n'
        f'[broker]\nurl = "{url}"\n{extra}\n[agent]\ndrain_timeout_s = 2\n'
    )
    return path


def exe(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed in this environment"
    return path


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    directory = tempfile.mkdtemp(prefix="sdn-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(directory, "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(directory, "notify"))
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def wait_for_line(log: Path, fragment: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if fragment in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{fragment!r} not in the log within {timeout:g} s:\n{log.read_text(errors='replace')}")


@pytest.fixture(autouse=True)
def thread_dumps_on_abort(monkeypatch: pytest.MonkeyPatch) -> None:
    """The services under test dump every thread's stack on SIGABRT (see sigterm)."""
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")


def sigterm(popen: subprocess.Popen[bytes], log: Path) -> str:
    popen.send_signal(signal.SIGTERM)
    try:
        code = popen.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # A hung shutdown: SIGABRT makes faulthandler write where every thread is to the log.
        popen.send_signal(signal.SIGABRT)
        popen.wait(timeout=30)
        raise AssertionError(f"no exit within 30 s of SIGTERM:\n{log.read_text(errors='replace')}") from None
    text = log.read_text(errors="replace")
    assert code == 0, f"exit {code}:\n{text}"
    assert "Traceback" not in text, text
    return text


def test_agent_sigterm_during_a_broker_outage_exits_0(tmp_path: Path, notify_socket: socket.socket) -> None:
    config = device_config(tmp_path, f"mqtt://127.0.0.1:{free_port()}")  # nothing listens there
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        popen = subprocess.Popen([exe("splitwise-device"), "run", "--config", str(config)], stderr=out, stdout=out)
    try:
        text = wait_for_line(log, "cannot connect to the broker", 60)
        time.sleep(2.5)  # a couple more attempts: 1 s, then 2 s later
        text = sigterm(popen, log)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert not any("READY=1" in m for m in drain(notify_socket)), "READY=1 without a broker"
    warnings = [line for line in text.splitlines() if "WARNING" in line and "broker" in line]
    assert 1 <= len(warnings) <= 3, warnings  # the first failure with its reason, then spaced reminders


def test_agent_sigterm_when_the_broker_refuses_the_password_exits_0(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    broker = LocalBroker(tmp_path / "broker", settings="allow_anonymous false\n")
    broker.start()
    try:
        secret = tmp_path / "password"
        secret.write_text("wrong")
        config = device_config(tmp_path, broker.url, f'username = "nobody"\npassword_file = "{secret}"\n')
        log = tmp_path / "agent.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([exe("splitwise-device"), "run", "--config", str(config)], stderr=out, stdout=out)
        try:
            wait_for_line(log, "refused the connection", 60)
            sigterm(popen, log)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
    finally:
        broker.stop()


def test_cloud_worker_sigterm_during_a_broker_outage_exits_0(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    command = [
        exe("splitwise-cloud"),
        "serve",
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
        "--model",
        str(bundled_model_path()),
        "--worker-id",
        "fd-w1",
        "--pool",
        "fdpool",
        "--profile",
        "off",
    ]
    with log.open("wb") as out:
        popen = subprocess.Popen(command, stderr=out, stdout=out)
    try:
        wait_for_line(log, "cannot connect to the broker", 60)
        sigterm(popen, log)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


def test_check_config_connect_reports_the_broker(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path)
    broker.start()
    url = broker.url
    try:
        ok = subprocess.run(
            [exe("splitwise-device"), "check-config", "--config", str(device_config(tmp_path, url)), "--connect"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        broker.stop()
    assert ok.returncode == 0, ok.stderr
    assert f"broker: connected to {broker.host}:{broker.port}" in ok.stdout
    port = free_port()
    bad = subprocess.run(
        [
            exe("splitwise-device"),
            "check-config",
            "--config",
            str(device_config(tmp_path, f"mqtt://127.0.0.1:{port}")),
            "--connect",
            "--connect-timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"broker: cannot connect to 127.0.0.1:{port}" in bad.stderr and "refused" in bad.stderr.lower()
    assert "Traceback" not in bad.stderr


def worker_command(broker_url: str, worker_id: str) -> list[str]:
    model = str(bundled_model_path())
    return [exe("splitwise-cloud"), "serve", "--broker", broker_url, "--model", model, "--worker-id", worker_id]


def test_cloud_worker_sends_ready_only_after_the_broker_connects(tmp_path: Path, notify_socket: socket.socket) -> None:
    """The broker is down at start: no READY=1; it comes up: READY=1, once."""
    port = free_port()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*worker_command(f"mqtt://127.0.0.1:{port}", "fd-ready"), "--profile", "off"], stderr=out, stdout=out
        )
    broker = None
    try:
        wait_for_line(log, "cannot connect to the broker", 60)
        assert not any("READY=1" in m for m in drain(notify_socket)), "READY=1 while the broker is down"
        (tmp_path / "broker").mkdir()
        broker = LocalBroker(tmp_path / "broker", port=port)  # the address the worker keeps trying
        broker.start()
        wait_for_line(log, "serving pool", 60)
        time.sleep(0.5)
        readies = [m for m in drain(notify_socket) if "READY=1" in m]
        assert len(readies) == 1, readies
        sigterm(popen, log)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
        if broker is not None:
            broker.stop()


def test_a_worker_reply_to_an_invalid_response_topic_is_one_log_line(tmp_path: Path) -> None:
    """A frame whose ResponseTopic has a wildcard: the reply is dropped with one warning, no traceback."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from cloud_offload.protocol import topics

    (tmp_path / "broker").mkdir()
    broker = LocalBroker(tmp_path / "broker")
    broker.start()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*worker_command(broker.url, "fd-bad"), "--pool", "fdbad", "--profile", "off"], stderr=out, stdout=out
        )
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fd-sender", protocol=mqtt.MQTTv5)
    try:
        wait_for_line(log, "serving pool", 60)
        client.connect(broker.host, broker.port)
        client.loop_start()
        for _ in range(5):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = "fd/replies/#"
            client.publish(
                topics.pool_segment_topic("fdbad"), b"not a frame", qos=1, properties=props
            ).wait_for_publish(5)
        text = wait_for_line(log, "reply dropped", 30)
        time.sleep(1)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text
        assert text.count("reply dropped") == 5, text
        assert popen.poll() is None, text
    finally:
        client.disconnect()
        client.loop_stop()
        if popen.poll() is None:
            sigterm(popen, log)
        broker.stop()
