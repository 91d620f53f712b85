"""Broker options a deployment needs: username/password and TLS, against a real mosquitto."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cloud_offload.local_broker import free_port as _free_port
from cloud_offload.local_broker import mosquitto_binary as _mosquitto_binary
from cloud_offload.mqtt import BrokerSettings, BrokerUnavailableError, MqttConnection

pytestmark = pytest.mark.broker


def start_broker(conf: Path, port: int) -> subprocess.Popen[bytes]:
    if os.geteuid() == 0:
        # As root mosquitto switches to its own user, which cannot read pytest's private tmp dirs.
        conf.write_text("user root\n" + conf.read_text())
    proc = subprocess.Popen([_mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    with proc:
        raise RuntimeError(f"mosquitto did not start: {proc.stderr.read() if proc.stderr else ''}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    with proc:  # closes its stderr pipe too
        proc.terminate()
        proc.wait(timeout=5)


def test_username_and_password(tmp_path: Path) -> None:
    passwd = shutil.which("mosquitto_passwd")
    assert passwd, "mosquitto_passwd comes with the mosquitto package"
    users = tmp_path / "passwd"
    subprocess.run([passwd, "-c", "-b", str(users), "edge", "s3cret"], check=True)
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {users}\n")
    proc = start_broker(conf, port)
    try:
        good = MqttConnection(BrokerSettings("127.0.0.1", port, username="edge", password="s3cret"), "auth-ok")
        good.start(timeout=5)
        good.stop()
        for user, password in (("edge", "wrong"), (None, None)):
            bad = MqttConnection(BrokerSettings("127.0.0.1", port, username=user, password=password), "auth-bad")
            with pytest.raises(BrokerUnavailableError):
                bad.start(timeout=2)
            bad.stop()
    finally:
        stop(proc)


def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=tmp_path)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=splitwise-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\ncafile {tmp_path / 'ca.crt'}\n"
        f"certfile {tmp_path / 'server.crt'}\nkeyfile {tmp_path / 'server.key'}\n"
    )
    proc = start_broker(conf, port)
    try:
        trusted = MqttConnection(BrokerSettings("127.0.0.1", port, tls=True, ca_file=str(tmp_path / "ca.crt")), "tls")
        trusted.start(timeout=5)
        trusted.stop()
        # The system trust store does not know our CA: the handshake must fail, not fall back to plain text.
        untrusted = MqttConnection(BrokerSettings("127.0.0.1", port, tls=True), "tls-untrusted")
        with pytest.raises(BrokerUnavailableError):
            untrusted.start(timeout=2)
        untrusted.stop()
    finally:
        stop(proc)
