"""A TCP forwarder with an off switch and an emulated link: bandwidth, delay, jitter, outages.

`LinkProxy(upstream_host, upstream_port)` listens on a free loopback port and forwards every
connection to the upstream (e.g. mosquitto). `cut()` drops every open connection at once and,
until `restore()`, accepts new ones only to close them straight away (the client sees its
connection reset, as with a dead link); `restore()` lets new connections through again.

Link emulation (keyword arguments, or `set_link()` at run time):

- `bandwidth_bps`: the link rate in bit/s (None = unlimited). Each direction is ONE shared
  bottleneck for all connections (the device has one uplink and one downlink): a chunk of n bytes
  occupies the direction for 8n/bandwidth seconds after the previous chunk — of any connection —
  finished. Chunks are cut into pieces of about 2 ms of serialisation time (≥ 1500 bytes) so a
  big recv() does not hold the link as one huge frame.
- `delay_s`: one-way propagation delay, added in each direction after serialisation (RTT ≥ 2×).
- `jitter_s`: a uniform random extra delay in [0, jitter_s] per piece; a piece is never delivered
  before the previous piece of the same connection and direction (TCP byte order is kept).

Per connection and direction a reader thread receives and schedules (deliver_at, bytes) into a
deque, and a sender thread sleeps until each deliver_at and sends (so a receiver that stops
reading stalls only its own connection). A reader stops reading once `queue_limit` bytes are
queued for its connection and direction, which pushes back on the sender's TCP window as a full
router queue would (without losing bytes). With no shaping configured and nothing queued, the
reader sends straight away (no thread hand-off; measured 13–33 µs per forwarded chunk, the cost of
the extra socket hop). TCP_NODELAY is set on both sockets of every connection. `bytes_up`
(client → upstream) and `bytes_down` (upstream → client) count the bytes delivered (counted as
they are handed to the receiving socket). `set_link()` applies to chunks read after the call;
already scheduled bytes keep their delivery time. The TCP handshake itself is not delayed (the
client connects to the local proxy); the first request/response pays the RTT.

Threads only, no asyncio, so it runs beside paho clients in any test.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time

# Pieces are ~2 ms of serialisation time at the configured rate, never smaller than one Ethernet frame.
_PIECE_SECONDS = 0.002
_MIN_PIECE = 1500
_RECV_SIZE = 65536


class _Direction:
    """One direction of the link: the shared serialisation clock and the delivered-byte count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.delivered = 0

    def occupy(self, nbytes: int, bandwidth_bps: float | None) -> float:
        """Reserves the link for `nbytes`; returns when their last bit has been sent."""
        with self._lock:
            now = time.monotonic()
            if bandwidth_bps is None:
                return now
            finish = max(now, self._free_at) + 8.0 * nbytes / bandwidth_bps
            self._free_at = finish
            return finish

    def count(self, nbytes: int) -> None:
        with self._lock:
            self.delivered += nbytes


class _Stream:
    """One direction of one connection: src → (schedule) → deque → sender → dst."""

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, direction: _Direction) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.direction = direction
        self.cond = threading.Condition()
        self.items: collections.deque[tuple[float, bytes | None]] = collections.deque()  # None = EOF
        self.queued = 0
        self.last_deliver = 0.0
        self.busy = False  # the sender is writing bytes it took off the deque
        self.closed = False

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.items.clear()
            self.queued = 0
            self.cond.notify_all()

    def read_loop(self) -> None:
        proxy = self.conn.proxy
        try:
            while data := self.src.recv(_RECV_SIZE):
                bandwidth, delay, jitter = proxy._params
                if bandwidth is None and delay == 0.0 and jitter == 0.0 and self._idle():
                    # Fast path: nothing queued and nothing to emulate. Only this thread adds items,
                    # so the sender stays idle while we write.
                    self.direction.count(len(data))
                    self.dst.sendall(data)
                    continue
                if not self._enqueue(data, bandwidth, delay, jitter, proxy.queue_limit):
                    return
        except OSError:
            self.conn.close()
            return
        # EOF: delivered after the bytes before it, then the whole connection goes down (like a link).
        with self.cond:
            if not self.closed:
                self.items.append((max(self.last_deliver, time.monotonic() + proxy._params[1]), None))
                self.cond.notify_all()

    def _idle(self) -> bool:
        with self.cond:
            return not self.items and not self.busy

    def _enqueue(self, data: bytes, bandwidth: float | None, delay: float, jitter: float, limit: int) -> bool:
        piece = len(data) if bandwidth is None else max(_MIN_PIECE, int(bandwidth / 8 * _PIECE_SECONDS))
        view = memoryview(data)
        for offset in range(0, len(data), piece):
            chunk = bytes(view[offset : offset + piece])
            with self.cond:
                while self.queued >= limit and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return False
            finish = self.direction.occupy(len(chunk), bandwidth)
            deliver_at = finish + delay + (random.uniform(0.0, jitter) if jitter > 0 else 0.0)
            with self.cond:
                if self.closed:
                    return False
                deliver_at = max(deliver_at, self.last_deliver)
                self.last_deliver = deliver_at
                self.items.append((deliver_at, chunk))
                self.queued += len(chunk)
                self.cond.notify_all()
        return True

    def send_loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.closed:
                        return
                    if self.items:
                        wait = self.items[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self.cond.wait(wait)
                    else:
                        self.cond.wait()
                # Everything due now goes out in one write.
                now = time.monotonic()
                batch: list[bytes] = []
                eof = False
                while self.items and self.items[0][0] <= now:
                    _at, chunk = self.items.popleft()
                    if chunk is None:
                        eof = True
                        break
                    batch.append(chunk)
                self.busy = True
            data = b"".join(batch)
            self.direction.count(len(data))  # before the write, so a reply never overtakes the count
            try:
                if data:
                    self.dst.sendall(data)
            except OSError:
                self.conn.close()
                return
            with self.cond:
                self.busy = False
                self.queued -= len(data)
                self.cond.notify_all()
            if eof:
                self.conn.close()
                return


class _Connection:
    def __init__(self, proxy: LinkProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.streams = (
            _Stream(self, client, upstream, proxy._up),
            _Stream(self, upstream, client, proxy._down),
        )
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        for stream in self.streams:
            threading.Thread(target=stream.read_loop, name="linkproxy-read", daemon=True).start()
            threading.Thread(target=stream.send_loop, name="linkproxy-send", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.proxy._forget(self)
        for stream in self.streams:
            stream.close()
        _close(self.client)
        _close(self.upstream)


class LinkProxy:
    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        bandwidth_bps: float | None = None,
        delay_s: float = 0.0,
        jitter_s: float = 0.0,
        queue_limit: int | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._cut = threading.Event()
        self._stopped = threading.Event()
        self._up = _Direction()
        self._down = _Direction()
        self._params: tuple[float | None, float, float] = (None, 0.0, 0.0)
        self._fixed_queue_limit = queue_limit
        self.queue_limit = 0
        self.set_link(bandwidth_bps=bandwidth_bps, delay_s=delay_s, jitter_s=jitter_s)
        self.accepted = 0
        self.refused = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._accept_loop, name="linkproxy-accept", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> LinkProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._drop_all()
        self._thread.join(timeout=2)
        self._listener.close()

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def set_link(self, *, bandwidth_bps: float | None = None, delay_s: float = 0.0, jitter_s: float = 0.0) -> None:
        """Sets the emulated link (all three; omitted ones go back to unlimited / zero).

        Applies to bytes read from now on; bytes already scheduled keep their delivery time.
        """
        if bandwidth_bps is not None and bandwidth_bps <= 0:
            raise ValueError(f"bandwidth_bps must be positive or None, not {bandwidth_bps}")
        if delay_s < 0 or jitter_s < 0:
            raise ValueError(f"delay_s and jitter_s must be ≥ 0, not {delay_s}, {jitter_s}")
        if self._fixed_queue_limit is not None:
            self.queue_limit = self._fixed_queue_limit
        elif bandwidth_bps is None:
            self.queue_limit = 4 << 20
        else:
            # Room for what is in flight (rate × (delay + jitter)) plus ~100 ms of queue, ≥ 256 KiB.
            in_flight = bandwidth_bps / 8 * (delay_s + jitter_s + 0.1)
            self.queue_limit = max(256 << 10, int(in_flight))
        self._params = (None if bandwidth_bps is None else float(bandwidth_bps), float(delay_s), float(jitter_s))

    @property
    def link(self) -> tuple[float | None, float, float]:
        """(bandwidth_bps, delay_s, jitter_s) now in effect."""
        return self._params

    @property
    def bytes_up(self) -> int:
        """Bytes delivered client → upstream."""
        return self._up.delivered

    @property
    def bytes_down(self) -> int:
        """Bytes delivered upstream → client."""
        return self._down.delivered

    def cut(self) -> None:
        """Drops every forwarded connection; refuses new ones until `restore()`."""
        self._cut.set()
        self._drop_all()

    def restore(self) -> None:
        self._cut.clear()

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _drop_all(self) -> None:
        with self._lock:
            connections, self._connections = list(self._connections), set()
            self.dropped += len(connections)
        for conn in connections:
            conn.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                self.refused += 1
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                self.refused += 1
                _close(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, upstream)
            with self._lock:
                if self._cut.is_set():  # cut while connecting
                    _close(client)
                    _close(upstream)
                    continue
                self._connections.add(conn)
                self.accepted += 1
            conn.start()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
