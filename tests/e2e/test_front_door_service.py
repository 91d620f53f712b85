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
from splitwise_device.tokenizer import bundled_model_path

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


def sigterm(popen: subprocess.Popen[bytes], log: Path) -> str:
    popen.send_signal(signal.SIGTERM)
    code = popen.wait(timeout=30)
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
