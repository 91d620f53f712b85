"""sd_notify over real unix datagram sockets, the watchdog environment, and the unit files."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitwise_core import systemd
from splitwise_device.config import load_device_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = ["splitwise-device.service", "splitwise-cloud.service", "splitwise-cloud@.service"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def path_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket on the file system, announced in $NOTIFY_SOCKET."""
    directory = tempfile.mkdtemp(prefix="sdn-")  # short: sun_path holds at most 107 bytes
    address = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket in the abstract namespace, announced as $NOTIFY_SOCKET=@name."""
    name = f"splitwise-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_everything_is_a_no_op_outside_systemd() -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.stopping() is False
    assert systemd.status("hello") is False
    assert systemd.watchdog_ping() is False
    assert systemd.extend_timeout(10) is False
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize("fixture", ["path_socket", "abstract_socket"])
def test_notifications_arrive_as_datagrams(fixture: str, request: pytest.FixtureRequest) -> None:
    sock: socket.socket = request.getfixturevalue(fixture)
    assert systemd.ready() is True
    assert receive(sock) == "READY=1"
    assert systemd.ready("serving dev1") is True
    assert receive(sock) == "READY=1\nSTATUS=serving dev1"
    assert systemd.status("queue 3/16\nplanner edge-only") is True
    assert receive(sock) == "STATUS=queue 3/16 planner edge-only"
    assert systemd.watchdog_ping() is True
    assert receive(sock) == "WATCHDOG=1"
    assert systemd.stopping("draining 2 requests") is True
    assert receive(sock) == "STOPPING=1\nSTATUS=draining 2 requests"
    assert systemd.extend_timeout(2.5) is True
    assert receive(sock) == "EXTEND_TIMEOUT_USEC=2500000"
    assert systemd.notify("STATUS=ünïcödé") is True
    assert receive(sock) == "STATUS=ünïcödé"


def test_every_call_sends_exactly_one_datagram(path_socket: socket.socket) -> None:
    for _ in range(5):
        assert systemd.watchdog_ping()
    got = [receive(path_socket) for _ in range(5)]
    assert got == ["WATCHDOG=1"] * 5
    path_socket.settimeout(0.05)
    with pytest.raises(TimeoutError):
        path_socket.recv(4096)


def test_a_receiver_that_stops_reading_does_not_hang_the_sender(
    path_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(systemd, "SEND_TIMEOUT_S", 0.2)
    results = []
    for _ in range(10_000):  # far beyond net.unix.max_dgram_qlen and the receive buffer
        start = time.monotonic()
        results.append(systemd.watchdog_ping())
        elapsed = time.monotonic() - start
        if not results[-1]:
            break
    assert results[0] is True and results[-1] is False
    assert elapsed < 2.0


def test_failures_return_false_and_never_raise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@splitwise-test-absent-{uuid.uuid4().hex}")
    assert systemd.watchdog_ping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not spoken here
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert systemd.ready() is False


def test_empty_state_is_not_sent(path_socket: socket.socket) -> None:
    assert systemd.notify("") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "junk")
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "2500")
    assert systemd.watchdog_interval() == pytest.approx(0.0025)
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


def test_notify_from_a_child_process(path_socket: socket.socket) -> None:
    """What systemd sees from a real process: a fresh interpreter notifying through the module."""
    code = "from splitwise_core import systemd; raise SystemExit(0 if systemd.ready('child') else 3)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=os.environ.copy(), timeout=60, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert receive(path_socket) == "READY=1\nSTATUS=child"


# ------------------------------------------------------------------ unit files


def unit_settings(name: str) -> dict[str, list[str]]:
    """``Key -> [values]`` of a unit file (all sections; comments and blank lines skipped)."""
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("name", UNITS)
def test_units_are_notify_services_with_watchdog_and_sandbox(name: str) -> None:
    s = unit_settings(name)
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert s["KillSignal"] == ["SIGTERM"]
    for key in ("DynamicUser", "NoNewPrivileges", "PrivateTmp"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["ReadOnlyPaths"] == ["/opt/splitwise"]
    assert "network-online.target" in s["Wants"][0] and "network-online.target" in s["After"][0]
    assert s["WantedBy"] == ["multi-user.target"]
    exec_start = s["ExecStart"][0]
    assert re.fullmatch(
        r"/usr/local/bin/splitwise-(device run|cloud serve) --config /etc/splitwise/\S+\.toml", exec_start
    )
    assert s["ExecStartPre"][0] == exec_start.replace(" run ", " check-config ").replace(" serve ", " check-config ")


def test_device_unit_gives_the_drain_time_to_stop() -> None:
    s = unit_settings("splitwise-device.service")
    assert s["StateDirectory"] == ["splitwise"]
    example = load_device_config(DEPLOY / "device.example.toml")
    assert example.device.state_dir == Path("/var/lib/splitwise")
    assert float(s["TimeoutStopSec"][0]) > example.agent.drain_timeout_s
    assert "/etc/splitwise/device.toml" in s["ExecStart"][0]
    credential = s["LoadCredential"][0].split(":")[0]
    assert example.broker.password_file == Path(f"/run/credentials/splitwise-device.service/{credential}")


def test_template_unit_uses_the_instance_name() -> None:
    s = unit_settings("splitwise-cloud@.service")
    assert s["ExecStart"] == ["/usr/local/bin/splitwise-cloud serve --config /etc/splitwise/cloud-%i.toml"]
    assert s["LoadCredential"] == ["mqtt-password:/etc/splitwise/mqtt-password-%i"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on copies of the units whose binaries point at stubs (it checks that
    ExecStart= binaries exist); the template is verified as instance ``gpu1-a``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("splitwise-device", "splitwise-cloud"):
        stub = bin_dir / tool
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = (DEPLOY / name).read_text().replace("/usr/local/bin/", f"{bin_dir}/")
        (units / name.replace("@.", "@gpu1-a.")).write_text(text)
    paths = sorted(str(p) for p in units.iterdir())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
