"""The link emulators do what they say: LinkProxy (delay, jitter, bandwidth, outage in user space)
and ShapedLink (a network namespace behind a tbf-shaped veth pair, with mosquitto inside).

Timing assertions bound what a noisy, shared machine cannot fake: a delay or a rate limit can only
make things slower, so lower bounds on time are tight; upper bounds are loose (about 2× ideal).
Run with `-s` to see the measured figures.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_offload.local_broker import LocalBroker
from evaluation import netns
from evaluation.linkproxy import LinkProxy

pytestmark = pytest.mark.broker


# --- a tiny threaded TCP server: "echo" sends back what it gets, "sink" counts and answers ---------


class Server:
    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.handler = handler
        self._thread = threading.Thread(target=self._accept, name="test-server-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="test-server-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown() does.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the server's accept thread did not end"


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def read_count(conn: socket.socket) -> int:
    buf = b""
    while not buf.endswith(b"\n"):
        data = conn.recv(1)
        if not data:
            raise ConnectionError("closed before the byte count")
        buf += data
    return int(buf)


# LinkProxy takes a connection down when either side closes (like a dead link): no half-close
# protocols, so the sink and the source are told the byte count up front.
def sink(conn: socket.socket) -> None:
    """Reads "<n>\\n" and n bytes, then answers with the count."""
    want, total = read_count(conn), 0
    while total < want and (data := conn.recv(65536)):
        total += len(data)
    conn.sendall(f"{total}\n".encode())


def source(conn: socket.socket) -> None:
    """Reads "<n>\\n", then sends n bytes."""
    conn.sendall(b"y" * read_count(conn))


@pytest.fixture(autouse=True)
def no_threads_left_behind() -> Iterator[None]:
    """Every test here ends the threads it started: servers, proxies, clients (threads that were
    running before the test are not its business)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while (left := [t for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"threads still running after the test: {sorted(t.name for t in left)}"


@pytest.fixture
def echo_server() -> Iterator[Server]:
    server = Server(echo)
    yield server
    server.close()


@pytest.fixture
def proxies() -> Iterator[list[LinkProxy]]:
    made: list[LinkProxy] = []
    yield made
    for proxy in made:
        proxy.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


def rtts(sock: socket.socket, count: int, size: int = 32) -> list[float]:
    times = []
    for i in range(count):
        msg = (f"{i:08d}" * (size // 8 + 1))[:size].encode()
        start = time.monotonic()
        sock.sendall(msg)
        assert recv_exactly(sock, size) == msg
        times.append(time.monotonic() - start)
    return times


def upload(port: int, nbytes: int) -> float:
    """Seconds from the first byte sent until the sink confirmed all `nbytes`."""
    with connect(port) as sock:
        start = time.monotonic()
        sock.sendall(f"{nbytes}\n".encode() + b"x" * nbytes)
        answer = sock.recv(64)
        took = time.monotonic() - start
    assert int(answer) == nbytes
    return took


def download(port: int, nbytes: int) -> float:
    with connect(port) as sock:
        start = time.monotonic()
        sock.sendall(f"{nbytes}\n".encode())
        got = 0
        while got < nbytes and (data := sock.recv(65536)):
            got += len(data)
        took = time.monotonic() - start
    assert got == nbytes
    return took


# --- LinkProxy -----------------------------------------------------------------------------------


def test_unshaped_proxy_adds_little(echo_server: Server, proxies: list[LinkProxy]) -> None:
    proxy = LinkProxy("127.0.0.1", echo_server.port).start()
    proxies.append(proxy)
    with connect(echo_server.port) as direct, connect(proxy.port) as via:
        rtts(direct, 50)
        rtts(via, 50)  # warm-up
        base = statistics.median(rtts(direct, 300))
        proxied = statistics.median(rtts(via, 300))
    per_hop = (proxied - base) / 2
    print(f"\nunshaped LinkProxy: RTT direct {base * 1e6:.0f} µs, via proxy {proxied * 1e6:.0f} µs "
          f"→ {per_hop * 1e6:.0f} µs per forwarded chunk")  # fmt: skip
    assert proxy.bytes_up == proxy.bytes_down == 350 * 32
    assert per_hop < 1e-3  # the goal is well under 0.1 ms; the bound leaves room for a busy machine


def test_delay_is_applied_each_way(echo_server: Server, proxies: list[LinkProxy]) -> None:
    delay = 0.04
    proxy = LinkProxy("127.0.0.1", echo_server.port, delay_s=delay).start()
    proxies.append(proxy)
    with connect(proxy.port) as sock:
        times = rtts(sock, 20)
    print(f"\ndelay {delay * 1e3:.0f} ms each way: RTT min {min(times) * 1e3:.1f} ms, "
          f"median {statistics.median(times) * 1e3:.1f} ms")  # fmt: skip
    assert min(times) >= 2 * delay
    assert statistics.median(times) < 2 * delay + 0.03


@pytest.mark.parametrize("direction", ["up", "down"])
def test_bandwidth_is_applied(direction: str, proxies: list[LinkProxy]) -> None:
    rate, nbytes = 20e6, 2_000_000
    ideal = 8 * nbytes / rate
    server = Server(sink if direction == "up" else source)
    try:
        proxy = LinkProxy("127.0.0.1", server.port, bandwidth_bps=rate).start()
        proxies.append(proxy)
        took = upload(proxy.port, nbytes) if direction == "up" else download(proxy.port, nbytes)
    finally:
        server.close()
    print(f"\n{direction}: 2 MB at 20 Mbit/s: {took:.3f} s (ideal {ideal:.3f} s), {8 * nbytes / took / 1e6:.2f} Mbit/s")
    assert took >= 0.95 * ideal
    assert took <= 2 * ideal
    counted = proxy.bytes_up if direction == "up" else proxy.bytes_down
    assert nbytes <= counted <= nbytes + 16  # plus the byte-count header


def test_one_bottleneck_shared_by_all_connections(proxies: list[LinkProxy]) -> None:
    rate, nbytes = 20e6, 1_000_000
    server = Server(sink)
    try:
        proxy = LinkProxy("127.0.0.1", server.port, bandwidth_bps=rate).start()
        proxies.append(proxy)
        results: list[float] = []
        start = time.monotonic()
        threads = [threading.Thread(target=lambda: results.append(upload(proxy.port, nbytes))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        took = time.monotonic() - start
    finally:
        server.close()
    ideal = 8 * 2 * nbytes / rate
    print(f"\ntwo 1 MB uploads at once over 20 Mbit/s: {took:.3f} s (ideal {ideal:.3f} s)")
    assert len(results) == 2
    assert took >= 0.95 * ideal
    assert took <= 2 * ideal


def test_jitter_keeps_byte_order(echo_server: Server, proxies: list[LinkProxy]) -> None:
    proxy = LinkProxy("127.0.0.1", echo_server.port, delay_s=0.005, jitter_s=0.02).start()
    proxies.append(proxy)
    messages = [f"<{i}>".encode() for i in range(2000)]
    sent = b"".join(messages)
    received = bytearray()
    with connect(proxy.port) as sock:

        def reader() -> None:
            while len(received) < len(sent):
                data = sock.recv(65536)
                if not data:
                    return
                received.extend(data)

        thread = threading.Thread(target=reader, name="test-jitter-reader", daemon=True)
        thread.start()
        for i, msg in enumerate(messages):  # many small writes, each its own chunk with its own random delay
            sock.sendall(msg)
            if i % 50 == 0:
                time.sleep(0.002)  # pacing: spread the writes out a little
        thread.join(10)  # the reader stops once every byte came back (or the connection closed)
        assert not thread.is_alive(), f"{len(received)} of {len(sent)} bytes came back within 10 s"
        times = rtts(sock, 30)
    assert bytes(received) == sent
    spread = max(times) - min(times)
    print(f"\njitter 20 ms: RTT min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms")
    assert min(times) >= 0.01
    assert spread > 0.005  # jitter does vary the delay


def connection_lost(sock: socket.socket, send: bytes, expect: int) -> str:
    """Sends `send`, then reads `expect` bytes; returns how the connection failed: "reset" or
    "closed" (EOF). A timeout is no such failure: it raises, and so does getting all the bytes."""
    try:
        if send:
            sock.sendall(send)
        recv_exactly(sock, expect)
    except TimeoutError:
        pytest.fail(f"the connection neither reset nor closed within {sock.gettimeout()} s: it hangs")
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except ConnectionError as err:  # recv_exactly's EOF
        assert str(err).startswith("closed after"), err
        return "closed"
    raise AssertionError(f"the connection still works: {expect} bytes came back")


def test_cut_and_restore_with_shaping(echo_server: Server, proxies: list[LinkProxy]) -> None:
    proxy = LinkProxy("127.0.0.1", echo_server.port, bandwidth_bps=5e6, delay_s=0.02, jitter_s=0.005).start()
    proxies.append(proxy)
    sock = connect(proxy.port)
    assert min(rtts(sock, 3)) >= 0.04
    sock.sendall(b"x" * 200_000)  # bytes still in flight when the link goes
    proxy.cut()
    # The open connection goes down at once (reset or EOF), long before the 5 s socket timeout.
    sock.settimeout(5)
    started = time.monotonic()
    how = connection_lost(sock, b"", 200_000 + 1)
    sock.close()
    print(f"\ncut: the open connection was {how} after {(time.monotonic() - started) * 1e3:.0f} ms")
    assert time.monotonic() - started < 2
    assert proxy.dropped == 1 and proxy.open_connections == 0 and proxy.is_cut
    # While cut, a new connection is accepted and closed straight away.
    with connect(proxy.port) as refused:
        refused.settimeout(5)
        connection_lost(refused, b"hello", 5)
    assert proxy.refused >= 1
    proxy.restore()
    with connect(proxy.port) as again:
        times = rtts(again, 3)
        assert min(times) >= 0.04
        assert proxy.open_connections == 1


def test_set_link_takes_effect(proxies: list[LinkProxy]) -> None:
    server = Server(echo)
    sink_server = Server(sink)
    try:
        proxy = LinkProxy("127.0.0.1", server.port).start()
        proxies.append(proxy)
        with connect(proxy.port) as sock:
            fast = statistics.median(rtts(sock, 10))
            proxy.set_link(delay_s=0.05)
            slow = min(rtts(sock, 5))
            proxy.set_link()
            fast_again = statistics.median(rtts(sock, 10))
        bulk = LinkProxy("127.0.0.1", sink_server.port, bandwidth_bps=40e6).start()
        proxies.append(bulk)
        quick = upload(bulk.port, 500_000)
        bulk.set_link(bandwidth_bps=5e6)
        assert bulk.link == (5e6, 0.0, 0.0)
        slow_upload = upload(bulk.port, 500_000)
    finally:
        server.close()
        sink_server.close()
    print(f"\nset_link: RTT {fast * 1e3:.2f} → {slow * 1e3:.1f} → {fast_again * 1e3:.2f} ms; "
          f"500 kB at 40 Mbit/s {quick:.3f} s → at 5 Mbit/s {slow_upload:.3f} s")  # fmt: skip
    assert slow >= 0.1
    assert fast < 0.05 and fast_again < 0.05
    assert slow_upload >= 0.95 * 8 * 500_000 / 5e6
    assert quick < slow_upload / 2


def test_mqtt_round_trip_through_delayed_proxy(mosquitto_broker: LocalBroker, proxies: list[LinkProxy]) -> None:
    delay = 0.03
    proxy = LinkProxy(mosquitto_broker.host, mosquitto_broker.port, delay_s=delay).start()
    proxies.append(proxy)
    with MqttClient(proxy.host, proxy.port) as client:
        took = [client.round_trip(b"ping") for _ in range(5)]
    print(f"\nMQTT publish-to-self through a {delay * 1e3:.0f} ms proxy: min {min(took) * 1e3:.1f} ms")
    # Up to the broker and back down: one RTT; with TCP_NODELAY everywhere no 40 ms delayed-ACK stalls.
    assert min(took) >= 2 * delay
    assert statistics.median(took) < 2 * delay + 0.035


# --- ShapedLink (kernel shaping) -----------------------------------------------------------------


class MqttClient:
    """A paho MQTT v5 client subscribed to one topic of its own."""

    def __init__(self, host: str, port: int) -> None:
        self.topic = f"splitwise/test/link/{uuid.uuid4().hex}"
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(bytes(msg.payload))
        subscribed: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda *_args: subscribed.put(True)
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(self.topic, qos=0)
        assert subscribed.get(timeout=10)

    def round_trip(self, payload: bytes, timeout: float = 30) -> float:
        start = time.monotonic()
        self.client.publish(self.topic, payload, qos=0)
        assert self.messages.get(timeout=timeout) == payload
        return time.monotonic() - start

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def require_netns() -> None:
    reason = netns.available()
    if reason is not None:
        pytest.skip(f"ShapedLink unavailable: {reason}")


def gone(link: netns.ShapedLink) -> bool:
    return link.name not in netns.namespaces() and link.root_dev not in netns.root_links()


def test_shaped_link_enforces_rate_on_mosquitto(tmp_path: Path) -> None:
    require_netns()
    rate, size = 10e6, 1 << 20
    ideal = 2 * 8 * size / rate  # up to the broker, then back down
    with netns.ShapedLink(rate) as link:
        assert link.name in netns.namespaces()
        with (
            LocalBroker(tmp_path, host=link.cloud_ip, command_prefix=link.prefix) as broker,
            MqttClient(broker.host, broker.port) as client,
        ):
            small = min(client.round_trip(b"ping") for _ in range(5))
            payload = os.urandom(size)
            took = client.round_trip(payload)
            link.set_rate(40e6)
            faster = client.round_trip(payload)
            link.set_rate(None)
            unshaped = client.round_trip(payload)
        print(f"\nShapedLink: small round trip {small * 1e3:.2f} ms; 1 MiB publish-to-self at 10 Mbit/s "
              f"{took:.3f} s (ideal {ideal:.3f} s, {2 * 8 * size / took / 1e6:.2f} Mbit/s goodput per direction), "
              f"at 40 Mbit/s {faster:.3f} s, unshaped {unshaped:.3f} s")  # fmt: skip
    assert gone(link)
    assert took >= 0.9 * ideal
    assert took <= 2 * ideal
    assert faster >= 0.9 * ideal / 4
    assert faster < took / 2
    assert unshaped < faster


def test_shaped_link_cleans_up_after_errors_and_stale_runs() -> None:
    require_netns()
    with pytest.raises(RuntimeError, match="boom"), netns.ShapedLink(None) as link:
        assert link.name in netns.namespaces()
        raise RuntimeError("boom")
    assert gone(link)
    # Leftovers of a killed run: a namespace and a veth named after a pid that no longer exists.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_ns, stale_dev = f"{netns.PREFIX_NS}{dead.pid}n0", f"{netns.PREFIX_ROOT}{dead.pid}n0"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "link", "add", stale_dev, "type", "veth", "peer", "name", f"{stale_dev}p"], check=True)
    try:
        removed = netns.cleanup_stale()
        assert stale_ns in removed and stale_dev in removed
        assert stale_ns not in netns.namespaces()
        assert stale_dev not in netns.root_links()
    finally:
        subprocess.run(["ip", "netns", "del", stale_ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", stale_dev], capture_output=True, check=False)
