"""Transport cost of offloading: MQTT + segment framing vs a raw TCP echo, then end-to-end ms/token per plan.

Part 1 — one decode-size segment (one token row of d = 576 floats as q8_0, in a real request frame)
round-tripped on loopback, in blocks interleaved across transports so machine noise hits all alike:

- ``raw TCP echo``: the frame's bytes, length-prefixed, echoed by a socket server thread
  (TCP_NODELAY both ways); no framing work, no broker;
- ``MQTT opaque echo``: the same bytes through mosquitto with our ``RpcClient`` (MQTT v5, QoS 1,
  ResponseTopic + CorrelationData), answered by a responder client that echoes them unchanged;
- ``MQTT + framing``: what the split executor does per cloud segment — ``encode_request`` of the
  array (one ATTN_PART op), the ``RpcClient`` round trip, a responder that runs ``decode_frame`` +
  ``Frame.tensor()`` and answers with ``encode_response`` (a frame of the same size), which the
  requester decodes again. No model compute.

Requester and responders live in this process (paho's network threads; the TCP server a thread).
Small MQTT packets on loopback are at the mercy of Nagle's algorithm meeting delayed ACKs (~40 ms
per stall), so MQTT is measured with TCP_NODELAY on the broker (mosquitto ``set_tcp_nodelay true``)
and on the clients (set by this benchmark), and — with fewer round trips when slow — with each
left at what mosquitto's defaults and ``MqttConnection`` give today (the "as configured" rows; the
client column shows what the socket actually has). It prints median and P95, what MQTT + framing
add over the raw echo, and the framing work alone (the same encode/decode chain without I/O).

Part 2 — end to end on loopback: a cloud worker process and a ``SplitExecutor`` in this process (one
compute thread each) generate --tokens greedy tokens from a fixed prompt under edge-only,
cloud-only, layer-split:15 and heads:4 (activation codecs q8_0 and f32), rounds interleaved across
the configurations. The main table uses TCP_NODELAY everywhere (the worker process is this file's
``--serve-worker`` mode: ``CloudWorker`` with TCP_NODELAY on its socket); a short second table runs
the stock ``python -m cloud_offload.cli serve`` against a default mosquitto. Per configuration:
medians over rounds of the prefill time, decode ms/token (median over steps), cloud requests and
bytes up/down per decode step, the median cloud round trip (including the worker's compute), and
whether the text equals edge-only's.

Run: python bench/transport.py [--round-trips N] [--tokens N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from cloud_offload.local_broker import LocalBroker
from cloud_offload.mqtt import BrokerSettings, MqttConnection, RpcClient
from cloud_offload.protocol import frames, topics
from policies.plan import parse_plan
from policies.segments import ModelDims, compile_plan
from splitwise_core.engine import Engine, model_sha256
from splitwise_core.ops import Op, OpKind
from splitwise_core.shutdown import StopRequest
from splitwise_core.tokenizer import bundled_model_path
from splitwise_device.executor import CloudLink, RecoveryPolicy, SplitExecutor

PROMPT = "The three most useful things to know about MQTT are"
PLANS = ("edge-only", "cloud-only", "layer-split:15", "heads:4")
POOL = "bench"
CODEC = "q8_0"
_LEN = struct.Struct("<I")
SLOW_BUDGET_S = 3.0  # per "as configured" row whose round trip is slow


# --- infrastructure ---------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def start_mosquitto(workdir: Path, stack: ExitStack, *, nodelay: bool) -> BrokerSettings:
    broker = LocalBroker(workdir, nodelay=nodelay)
    broker.start()
    stack.callback(broker.stop)
    return broker.broker_settings


def connect(settings: BrokerSettings, prefix: str, stack: ExitStack, *, force_nodelay: bool) -> MqttConnection:
    conn = MqttConnection(settings, f"{prefix}-{uuid.uuid4().hex[:8]}")
    if force_nodelay:
        conn.client.on_socket_open = _nodelay
    conn.start(timeout=10)
    stack.callback(conn.stop)
    return conn


def socket_nodelay(conn: MqttConnection) -> bool:
    sock = conn.client.socket()
    return sock is not None and bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(median, P95) in milliseconds of samples in seconds."""
    arr = np.asarray(samples) * 1e3
    return float(np.median(arr)), float(np.percentile(arr, 95))


# --- part 1: one segment round trip -----------------------------------------------------------


def tcp_echo_server(stack: ExitStack) -> int:
    """A thread echoing length-prefixed messages on a loopback port; returns the port."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port: int = server.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    head = _recv_exact(conn, _LEN.size)
                    body = _recv_exact(conn, _LEN.unpack(head)[0])
                except OSError:
                    return
                conn.sendall(head + body)

    threading.Thread(target=serve, name="tcp-echo", daemon=True).start()
    stack.callback(server.close)
    return port


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


class MqttPath:
    """A requester (RpcClient) and a responder client on one broker; `echo` and `frame` each do
    one timed round trip."""

    def __init__(
        self, settings: BrokerSettings, stack: ExitStack, force_nodelay: bool, request_frame: Callable[[int], bytes]
    ) -> None:
        self.request_frame = request_frame
        self.wire = request_frame(0)
        responder = connect(settings, "bench-responder", stack, force_nodelay=force_nodelay)
        requester = connect(settings, "bench-requester", stack, force_nodelay=force_nodelay)
        self.client_nodelay = socket_nodelay(responder) and socket_nodelay(requester)
        self.echo_topic, self.frame_topic = f"bench/rt/{uuid.uuid4().hex[:8]}/echo", f"bench/rt/{uuid.uuid4().hex[:8]}"

        def reply(msg: mqtt.MQTTMessage, payload: bytes) -> None:
            props = msg.properties
            responder.publish(props.ResponseTopic, payload, correlation_data=props.CorrelationData)  # type: ignore[union-attr]

        def on_frame(msg: mqtt.MQTTMessage) -> None:
            frame = frames.decode_frame(msg.payload)
            reply(msg, frames.encode_response(frame, frame.tensor()))

        responder.subscribe(self.echo_topic, lambda msg: reply(msg, msg.payload))
        responder.subscribe(self.frame_topic, on_frame)
        self.rpc = RpcClient(requester, f"bench/rt/reply/{uuid.uuid4().hex[:8]}")
        time.sleep(0.3)  # let the SUBACKs arrive before the first request

    def echo(self, _step: int) -> float:
        wire = self.wire
        t0 = time.perf_counter()
        _corr, future = self.rpc.request(self.echo_topic, wire)
        msg = future.result(timeout=10)
        elapsed = time.perf_counter() - t0
        assert len(msg.payload) == len(wire)
        return elapsed

    def frame(self, step: int) -> float:
        t0 = time.perf_counter()
        _corr, future = self.rpc.request(self.frame_topic, self.request_frame(step))
        msg = future.result(timeout=10)
        y = frames.decode_frame(msg.payload).tensor()
        elapsed = time.perf_counter() - t0
        assert y.shape == (1, 576)
        return elapsed


def segment_round_trips(tuned: BrokerSettings, stock: BrokerSettings, n: int, stack: ExitStack) -> None:
    rng = np.random.default_rng(0)
    d = 576
    x = rng.standard_normal((1, d)).astype(np.float32)
    session, model_hash = uuid.uuid4(), bytes(range(16))
    ops = (Op(OpKind.ATTN_PART, 7, (0, 1, 2)),)

    def request_frame(step: int) -> bytes:
        return frames.encode_request(
            session=session,
            step=step,
            position=16 + step,
            segment=3,
            model_hash=model_hash,
            ops=ops,
            tensor=x,
            codec=CODEC,
        )

    wire = request_frame(0)
    resp = frames.encode_response(frames.decode_frame(wire), x)

    # Framing alone: the same chain as one MQTT + framing round trip, without any I/O.
    enc_s: list[float] = []
    dec_s: list[float] = []

    def framing(step: int) -> float:
        t0 = time.perf_counter()
        req = request_frame(step)
        t1 = time.perf_counter()
        frame = frames.decode_frame(req)
        y = frame.tensor()
        t2 = time.perf_counter()
        back = frames.decode_frame(frames.encode_response(frame, y)).tensor()
        t3 = time.perf_counter()
        assert back.shape == x.shape
        enc_s.append(t1 - t0)
        dec_s.append(t2 - t1)
        return t3 - t0

    tcp = socket.create_connection(("127.0.0.1", tcp_echo_server(stack)))
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stack.callback(tcp.close)

    def tcp_echo(_step: int) -> float:
        t0 = time.perf_counter()
        tcp.sendall(_LEN.pack(len(wire)) + wire)
        got = _recv_exact(tcp, _LEN.size + len(wire))
        elapsed = time.perf_counter() - t0
        assert len(got) == _LEN.size + len(wire)
        return elapsed

    fast = MqttPath(tuned, stack, True, request_frame)
    stock_broker = MqttPath(stock, stack, True, request_frame)
    stock_clients = MqttPath(tuned, stack, False, request_frame)
    stock_both = MqttPath(stock, stack, False, request_frame)

    def onoff(flag: bool) -> str:
        return "on" if flag else "off"

    # (label, broker nodelay, client nodelay, fn)
    rows: list[tuple[str, str, str, Callable[[int], float]]] = [
        ("raw TCP echo", "-", "on", tcp_echo),
        ("MQTT opaque echo", "on", onoff(fast.client_nodelay), fast.echo),
        ("MQTT + framing", "on", onoff(fast.client_nodelay), fast.frame),
        ("  as configured", "off", onoff(stock_broker.client_nodelay), stock_broker.frame),
        ("  as configured", "on", onoff(stock_clients.client_nodelay), stock_clients.frame),
        ("  as configured", "off", onoff(stock_both.client_nodelay), stock_both.frame),
        ("framing alone", "-", "-", framing),
    ]
    counts: list[int] = []
    for _label, _b, _c, fn in rows:  # warm-up; slow rows get a time budget instead of n round trips
        med = statistics.median(fn(i) for i in range(20))
        counts.append(n if med < 2e-3 else max(20, min(n, int(SLOW_BUDGET_S / med))))
    enc_s.clear()
    dec_s.clear()
    samples: list[list[float]] = [[] for _ in rows]
    block = 100
    for start in range(0, n, block):
        for (_label, _b, _c, fn), values, count in zip(rows, samples, counts, strict=True):
            values += [fn(start + i) for i in range(min(block, count - len(values)))]

    print(
        f"== 1. one decode-size segment: 1x{d} f32 as {CODEC}, request frame {len(wire)} B, response frame "
        f"{len(resp)} B; up to {n} round trips each, interleaved in blocks of {block}"
    )
    header = (
        f"{'round trip':<18} {'broker':>6} {'client':>6} {'n':>5} | {'median ms':>9} {'P95 ms':>8} | "
        f"{'+median vs TCP':>14} {'+P95 vs TCP':>11}"
    )
    print(f"{'':<18} {'TCP_NODELAY':>13}")
    print(header)
    print("-" * len(header))
    tcp_med, tcp_p95 = percentiles(samples[0])
    for (label, broker, client, _fn), values in zip(rows, samples, strict=True):
        med, p95 = percentiles(values)
        added = f"{med - tcp_med:>+14.3f} {p95 - tcp_p95:>+11.3f}" if label != "framing alone" else ""
        print(f"{label:<18} {broker:>6} {client:>6} {len(values):>5} | {med:>9.3f} {p95:>8.3f} | {added}".rstrip())
    print(
        f"framing alone, per request frame: encode {np.median(enc_s) * 1e6:.1f} us, "
        f"decode + dequantize {np.median(dec_s) * 1e6:.1f} us (the chain above also answers and decodes the reply)"
    )
    full_med, _ = percentiles(samples[2])
    echo_med, _ = percentiles(samples[1])
    stock_med, _ = percentiles(samples[5])
    added = full_med - tcp_med
    print(
        f"added by MQTT + framing over raw TCP (median, TCP_NODELAY everywhere): {added:.3f} ms "
        f"(broker + paho + RpcClient {echo_med - tcp_med:.3f} ms, framing {full_med - echo_med:.3f} ms); "
        f"target <= 1 ms: {'met' if added <= 1.0 else 'NOT met'}"
    )
    print(f"as configured (mosquitto defaults, MqttConnection's socket): {stock_med - tcp_med:.3f} ms added")


# --- part 2: end to end per plan ---------------------------------------------------------------


def serve_worker(broker_url: str, worker_id: str) -> None:
    """--serve-worker: a CloudWorker like `splitwise-cloud serve`, with TCP_NODELAY on its socket."""
    from cloud_offload.worker import CloudWorker

    worker = CloudWorker(
        bundled_model_path(), worker_id=worker_id, pool=POOL, broker=BrokerSettings.from_url(broker_url), threads=1
    )
    worker.connection.client.on_socket_open = _nodelay
    stop = StopRequest()
    worker.start(connect_timeout=None)
    while not stop.wait(1.0):
        pass
    worker.stop()


def start_worker(settings: BrokerSettings, stock: bool, workdir: Path, stack: ExitStack) -> None:
    worker_id = f"bench-{uuid.uuid4().hex[:6]}"
    url = f"mqtt://{settings.host}:{settings.port}"
    if stock:
        args = ["-m", "cloud_offload.cli", "serve", "--broker", url, "--model", str(bundled_model_path())]
        args += [
            "--pool",
            POOL,
            "--worker-id",
            worker_id,
            "--threads",
            "1",
            "--log-level",
            "WARNING",
            "--profile",
            "off",
        ]
    else:
        args = [str(Path(__file__).resolve()), "--serve-worker", url, worker_id]
    log_path = workdir / f"{worker_id}.log"
    log = log_path.open("wb")
    stack.callback(log.close)
    proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)
    stack.callback(_stop, proc)
    online = threading.Event()

    def on_status(msg: mqtt.MQTTMessage) -> None:
        try:
            if json.loads(msg.payload).get("state") == "online":
                online.set()
        except ValueError:
            pass

    watcher = connect(settings, "bench-watch", stack, force_nodelay=False)
    watcher.subscribe(topics.worker_status_topic(worker_id), on_status)
    deadline = time.monotonic() + 120
    while not online.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise SystemExit(f"the cloud worker did not come online (exit {proc.returncode}); its log:\n{tail}")


Config = tuple[str, str]  # (plan, codec)


def run_plans(
    engine: Engine,
    settings: BrokerSettings,
    force_nodelay: bool,
    configs: list[Config],
    tokens: int,
    rounds: int,
    warmup: bool,
    stack: ExitStack,
) -> dict[Config, list[dict[str, Any]]]:
    cfg = engine.config
    prompt = engine.tokenizer.encode(PROMPT)
    conn = connect(settings, "bench-edge", stack, force_nodelay=force_nodelay)
    rpc = RpcClient(conn, topics.device_reply_topic("bench-edge", uuid.uuid4().hex[:8]))
    model_hash = frames.model_hash_prefix(model_sha256(engine.path))
    policy = RecoveryPolicy(segment_timeout_s=10.0)
    time.sleep(0.3)

    def run(plan_name: str, codec: str, n_tokens: int) -> dict[str, Any]:
        executor = SplitExecutor.over_mqtt(
            engine.model,
            engine.tokenizer.eos_id,
            rpc,
            pool=POOL,
            model_hash=model_hash,
            codec=codec if codec != "-" else CODEC,
            policy=policy,
        )
        # Keep the links the executor opens, to read their counters after the prefill.
        links: list[CloudLink] = []
        new_link = executor.link_factory
        assert new_link is not None

        def link() -> CloudLink:
            links.append(new_link())
            return links[-1]

        executor.link_factory = link

        after_prefill: list[tuple[int, int, int, int]] = []

        def on_token(_token: int) -> None:
            if not after_prefill and links:
                s = links[0].stats
                after_prefill.append((s.requests, s.bytes_up, s.bytes_down, len(s.round_trip_s)))

        schedule = compile_plan(parse_plan(plan_name, cfg["n_layer"], cfg["n_head"]), ModelDims.from_config(cfg))
        result = executor.generate(prompt, schedule, n_tokens, on_token=on_token)
        if result.events or result.fell_back_to_edge:
            print(f"  warning: {plan_name}/{codec} had recovery events: {[e.to_json() for e in result.events]}")
        steps = max(1, len(result.steps) - 1)
        s = result.transfer
        req0, up0, down0, rt0 = after_prefill[0] if after_prefill else (0, 0, 0, 0)
        decode_rtts = s.round_trip_s[rt0:]
        decode_s = [t.seconds for t in result.steps[1:]] or [0.0]
        return {
            "prefill_s": result.steps[0].seconds,
            "decode_ms": statistics.median(decode_s) * 1e3,
            "req": (s.requests - req0) / steps,
            "up": (s.bytes_up - up0) / steps,
            "down": (s.bytes_down - down0) / steps,
            "rtt_ms": statistics.median(decode_rtts) * 1e3 if decode_rtts else 0.0,
            "tokens": result.tokens,
        }

    if warmup:  # page in the weights on both sides and open the session paths
        for plan_name, codec in configs:
            run(plan_name, codec, 4)
    results: dict[Config, list[dict[str, Any]]] = {c: [] for c in configs}
    for _ in range(rounds):
        for plan_name, codec in configs:
            results[(plan_name, codec)].append(run(plan_name, codec, tokens))
    return results


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def print_plans(results: dict[Config, list[dict[str, Any]]], reference: list[int], edge_ms: float) -> None:
    header = (
        f"{'plan':<15} {'codec':>5} | {'prefill s':>9} {'decode ms/tok':>13} {'vs edge':>8} | {'req/tok':>7} "
        f"{'up B/tok':>8} {'down B/tok':>10} {'cloud RTT ms':>12} | {'= edge-only for':>16}"
    )
    print(header)
    print("-" * len(header))
    for (plan_name, codec), rows in results.items():

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return float(statistics.median(r[key] for r in rows))

        agree = sorted({_common_prefix(r["tokens"], reference) for r in rows})
        same = "all" if agree == [len(reference)] else "/".join(str(a) for a in agree)
        decode = med("decode_ms")
        print(
            f"{plan_name:<15} {codec:>5} | {med('prefill_s'):>9.3f} {decode:>13.2f} {decode / edge_ms:>7.2f}x | "
            f"{med('req'):>7.1f} {med('up'):>8.0f} {med('down'):>10.0f} {med('rtt_ms'):>12.3f} | "
            f"{same:>16}"
        )


def end_to_end(
    tuned: BrokerSettings, stock: BrokerSettings, args: argparse.Namespace, workdir: Path, stack: ExitStack
) -> None:
    engine = Engine(bundled_model_path(), threads=1)
    prompt = engine.tokenizer.encode(PROMPT)
    codecs = args.codecs.split(",")
    configs = [("edge-only", "-")] + [(plan, codec) for plan in PLANS[1:] for codec in codecs]
    with ExitStack() as tuned_stack:
        start_worker(tuned, False, workdir, tuned_stack)
        results = run_plans(engine, tuned, True, configs, args.tokens, args.rounds, True, tuned_stack)
    reference = results[("edge-only", "-")][0]["tokens"]
    edge_ms = statistics.median(r["decode_ms"] for r in results[("edge-only", "-")])
    print()
    print(
        f"== 2. end to end on loopback: {engine.path.name}, prompt {len(prompt)} tokens, {args.tokens} tokens greedy; "
        f"worker process + edge executor, 1 compute thread each; TCP_NODELAY on broker and clients; "
        f"medians of {args.rounds} interleaved rounds"
    )
    print_plans(results, reference, edge_ms)
    print(
        "(req/tok, bytes and cloud RTT are per decode step; the RTT includes the worker's compute; "
        "'= edge-only for': how many leading tokens equal edge-only's, per distinct round)"
    )
    if args.stock_tokens > 0:
        stock_configs = [(plan, CODEC) for plan in PLANS[1:]]
        with ExitStack() as stock_stack:
            start_worker(stock, True, workdir, stock_stack)
            stock_results = run_plans(engine, stock, False, stock_configs, args.stock_tokens, 1, False, stock_stack)
        print()
        print(
            f"as configured: `python -m cloud_offload.cli serve`, mosquitto defaults, MqttConnection's sockets; "
            f"{args.stock_tokens} tokens, 1 round, no warm-up"
        )
        print_plans(stock_results, reference, edge_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=2000, help="round trips per transport in part 1")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per plan and round in part 2")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the plans in part 2")
    parser.add_argument("--codecs", default="q8_0,f32", help="activation codecs of the cloud plans in part 2")
    parser.add_argument("--stock-tokens", type=int, default=4, help="tokens per plan with stock settings (0: skip)")
    parser.add_argument("--skip-e2e", action="store_true", help="only part 1")
    parser.add_argument("--serve-worker", nargs=2, metavar=("BROKER_URL", "WORKER_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker:
        serve_worker(*args.serve_worker)
        return
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="splitwise-bench-") as tmp:
        tuned = start_mosquitto(Path(tmp), stack, nodelay=True)
        stock = start_mosquitto(Path(tmp), stack, nodelay=False)
        print(f"mosquitto on 127.0.0.1:{tuned.port} (set_tcp_nodelay true) and :{stock.port} (defaults); ", end="")
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        segment_round_trips(tuned, stock, args.round_trips, stack)
        if not args.skip_e2e:
            end_to_end(tuned, stock, args, Path(tmp), stack)


if __name__ == "__main__":
    main()
