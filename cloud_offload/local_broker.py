"""A mosquitto process on a free port: what the demo, the tests and the benchmarks start.

Configured the way Splitwise needs a broker: MQTT v5, no persistence, and `set_tcp_nodelay true`
(small request/response segments otherwise wait ~40 ms for delayed ACKs; see bench/transport.py).
It can be stopped and started again on the same port (broker-restart tests), and it only ever
stops the process it started.

By default it listens on 127.0.0.1. `host` and `command_prefix` run it elsewhere, e.g. inside a
network namespace (evaluation/netns.py): `LocalBroker(dir, host=link.cloud_ip,
command_prefix=link.prefix)` runs `ip netns exec NAME mosquitto -c ...` listening on the
namespace's veth address; the readiness check connects to host:port from this process's namespace.
The port comes from `free_port()` (free on the root namespace's loopback); a fresh namespace has
every port free, so that choice is good there too.

The log (`log`) has errors, warnings and notices; `log_types` adds more of mosquitto's log types,
e.g. ``("debug",)``: a line per packet, such as ``Sending PUBLISH to CLIENT_ID (d0, q1, r0, m3,
'TOPIC', ... (N bytes))``, which shows which client a shared subscription handed a message to.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from cloud_offload.mqtt import BrokerSettings, BrokerUnavailableError

SEARCH_PATH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in SEARCH_PATH if os.access(p, os.X_OK)), None)
    if found is None:
        raise BrokerUnavailableError(
            "mosquitto is not installed (scripts/setup installs it: apt-get install mosquitto)"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class LocalBroker:
    def __init__(
        self,
        workdir: Path,
        *,
        nodelay: bool = True,
        settings: str = "allow_anonymous true\n",
        host: str = "127.0.0.1",
        command_prefix: Sequence[str] = (),
        log_types: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        """`port`: a given one (a service that keeps retrying it, say), else a free one."""
        self.host = host
        self.command_prefix = list(command_prefix)
        self.port = free_port() if port is None else port
        self.config = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        # As root mosquitto switches to its own user, which cannot write into private temp dirs.
        user = "user root\n" if os.geteuid() == 0 else ""
        log_lines = "".join(f"log_type {t}\n" for t in ("error", "warning", "notice", *log_types))
        self.config.write_text(
            f"{user}listener {self.port} {self.host}\n{settings}persistence false\n"
            f"{'set_tcp_nodelay true' if nodelay else ''}\n"
            f"log_dest file {self.log}\n{log_lines}"
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def broker_settings(self) -> BrokerSettings:
        return BrokerSettings(self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 10.0) -> None:
        if self._process is not None:
            raise RuntimeError("broker already running")
        self._process = subprocess.Popen(
            [*self.command_prefix, mosquitto_binary(), "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if not wait_for_port(self.host, self.port, self._process, timeout):
            err = b""
            if self._process.poll() is not None and self._process.stderr is not None:
                err = self._process.stderr.read()
            self.stop()
            where = f"{self.host}:{self.port}"
            raise BrokerUnavailableError(
                f"mosquitto did not listen on {where} within {timeout:g}s: {err.decode(errors='replace')}"
            )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        finally:
            if process.stderr is not None:
                process.stderr.close()

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()
