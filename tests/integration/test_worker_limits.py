"""The worker's front door under abuse: per-frame row and context bounds, per-device frame rates,
a clean SIGTERM with no broker, and no spurious llama.cpp warning at start ("The front door never
dies"). Real broker, real SmolLM2 model."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_offload.local_broker import LocalBroker, free_port
from cloud_offload.mqtt import BrokerSettings, MqttConnection, RpcClient
from cloud_offload.protocol import frames, topics
from cloud_offload.worker import CloudWorker
from splitwise_core import codecs
from splitwise_core.engine import model_sha256
from splitwise_core.ops import Op, OpKind
from splitwise_core.tokenizer import bundled_model_path

POOL = "limits"
D_MODEL = 576
CONTEXT = 8192  # SmolLM2-135M


def subscriptions_settled(conn: MqttConnection, wait_s: float = 5.0) -> None:
    """Returns once the broker handled every SUBSCRIBE `conn` sent so far (it answers one client's
    packets in order, so a fresh subscription's SUBACK comes after theirs)."""
    conn.subscribe(f"test/settled/{uuid.uuid4().hex}", lambda _msg: None, wait_s=wait_s)


def _edge(broker: LocalBroker, device: str) -> tuple[MqttConnection, RpcClient]:
    conn = MqttConnection(BrokerSettings(broker.host, broker.port), f"edge-{device}-{uuid.uuid4().hex[:6]}")
    conn.start()
    rpc = RpcClient(conn, topics.device_reply_topic(device, uuid.uuid4().hex[:12]))
    subscriptions_settled(conn)  # the reply topic
    return conn, rpc


@pytest.fixture
def worker_edges(mosquitto_broker: LocalBroker, request: pytest.FixtureRequest) -> Iterator[Any]:
    options: dict[str, Any] = getattr(request, "param", {})
    settings = BrokerSettings(mosquitto_broker.host, mosquitto_broker.port)
    worker = CloudWorker(bundled_model_path(), worker_id="wlim", pool=POOL, broker=settings, **options)
    worker.start()
    edges = [_edge(mosquitto_broker, name) for name in ("dev-a", "dev-b")]
    subscriptions_settled(worker.connection)  # the pool and worker topics
    try:
        yield worker, [rpc for _, rpc in edges], frames.model_hash_prefix(model_sha256(bundled_model_path()))
    finally:
        for conn, _ in edges:
            conn.stop()
        worker.stop()


def _request(model_hash: bytes, rows: int, *, position: int = 0, session: uuid.UUID | None = None, **kw: Any) -> bytes:
    x = kw.pop("tensor", None)
    if x is None:
        x = np.random.default_rng(rows).standard_normal((rows, D_MODEL)).astype(np.float32)
    return frames.encode_request(
        session=session or uuid.uuid4(),
        step=kw.pop("step", 0),
        position=position,
        segment=kw.pop("segment", 0),
        model_hash=model_hash,
        ops=kw.pop("ops", [Op(OpKind.ATTN_PART, 0, (0, 1, 2))]),
        tensor=x,
        codec=kw.pop("codec", "f32"),
        **kw,
    )


def _with_nan_last(frame: bytes) -> bytes:
    """The f32 payload's last element (just before the CRC) made NaN, the CRC recomputed: a frame
    that passes every structural check but whose tensor does not decode."""
    body = frame[:-8] + struct.pack("<f", float("nan"))
    return body + struct.pack("<I", codecs.crc32c(body))


def _answer(rpc: RpcClient, payload: bytes, timeout: float = 30.0) -> frames.Frame:
    msg = rpc.request(topics.pool_segment_topic(POOL), payload)[1].result(timeout=timeout)
    return frames.decode_frame(msg.payload)


def _error(frame: frames.Frame) -> tuple[str, str]:
    assert frame.kind is frames.FrameKind.ERROR, f"expected an error frame, got {frame.kind.name}"
    return frame.error()


# --- defect 1: rows per frame, the context, the KV cap -------------------------------------------


@pytest.mark.parametrize("worker_edges", [{"max_rows_per_frame": 64}], indirect=True)
def test_rows_past_the_limit_or_the_context_are_refused_before_any_work(worker_edges: Any) -> None:
    worker, (rpc, _), model_hash = worker_edges
    started = time.perf_counter()
    code, message = _error(_answer(rpc, _request(model_hash, 65)))
    assert code == "bad_frame" and message.startswith("too_many_rows:"), message
    # Past the model's context: refused whatever the row limit (position 8190 + 4 rows > 8192).
    code, message = _error(_answer(rpc, _request(model_hash, 4, position=CONTEXT - 2)))
    assert code == "bad_frame" and message.startswith("position_out_of_range:"), message
    code, message = _error(_answer(rpc, _request(model_hash, 1, position=2**32 - 1)))
    assert code == "bad_frame" and message.startswith("position_out_of_range:"), message
    # A FFN frame has no KV but is still bounded by the context and the row limit.
    ffn = [Op(OpKind.FFN, 2)]
    assert _error(_answer(rpc, _request(model_hash, 65, ops=ffn)))[1].startswith("too_many_rows:")
    assert time.perf_counter() - started < 5.0  # nothing was computed
    assert not worker.sessions  # and nothing was created
    # The limit itself is served, and the worker says what its limit is.
    assert _answer(rpc, _request(model_hash, 64)).kind is frames.FrameKind.RESPONSE
    assert b'"max_rows_per_frame": 64' in worker._status("online")


def test_the_default_row_limit_refuses_a_frame_past_the_context(worker_edges: Any) -> None:
    """The issue's attack: one ATTN_PART of 8,300 rows, past the context (quadratic: seconds of compute on the only
    compute thread) is refused at once."""
    worker, (rpc, _), model_hash = worker_edges
    started = time.perf_counter()
    code, message = _error(_answer(rpc, _request(model_hash, 8_300)))
    # 19 MB: refused on arrival as larger than any frame this worker computes, before decoding.
    assert code == "bad_frame" and message.startswith(("too_large:", "too_many_rows:")), message
    assert time.perf_counter() - started < 5.0
    assert not worker.sessions and worker.kv_bytes() == 0


@pytest.mark.parametrize("worker_edges", [{"kv_memory_cap": 600_000}], indirect=True)
def test_the_kv_cap_makes_room_before_computing(worker_edges: Any) -> None:
    """Two sessions of 256 rows of KV each exceed a 600 kB cap: the older one is evicted before the
    newer one's frame runs, so the KV never holds both."""
    worker, (rpc, _), model_hash = worker_edges
    peaks: list[int] = []
    original = worker.run_ops

    def spy(session: Any, frame: frames.Frame, x: Any = None) -> Any:
        peaks.append(worker.kv_bytes())
        out = original(session, frame, x)
        peaks.append(worker.kv_bytes())
        return out

    worker.run_ops = spy
    first, second = uuid.uuid4(), uuid.uuid4()
    layer0 = [Op(OpKind.LAYER, 0)]
    assert _answer(rpc, _request(model_hash, 256, session=first, ops=layer0)).kind is frames.FrameKind.RESPONSE
    assert _answer(rpc, _request(model_hash, 256, session=second, ops=layer0)).kind is frames.FrameKind.RESPONSE
    assert list(worker.sessions) == [second] and worker.stats.sessions_evicted == 1
    assert max(peaks) <= 600_000, peaks


# --- defects 2 and 3: NaN is a bad frame; nothing is created for a frame that is not computed ---


def test_a_nan_payload_is_a_bad_frame(worker_edges: Any) -> None:
    """docs/protocol.md: a payload that decodes to NaN/Inf is FrameFault bad_payload, answered bad_frame."""
    _, (rpc, _), model_hash = worker_edges
    code, message = _error(_answer(rpc, _with_nan_last(_request(model_hash, 2))))
    assert code == "bad_frame" and message.startswith("bad_payload:"), message


def test_frames_that_are_not_computed_create_no_session(worker_edges: Any) -> None:
    worker, (rpc, _), model_hash = worker_edges
    session = uuid.uuid4()
    _error(_answer(rpc, _with_nan_last(_request(model_hash, 2, session=session))))
    assert session not in worker.sessions
    # A wrong width, a KV jump on an unknown session and a bare CLOSE do not leave an entry either.
    wide = np.ones((2, D_MODEL + 1), dtype=np.float32)
    code, message = _error(_answer(rpc, _request(model_hash, 2, tensor=wide, session=session)))
    assert code == "bad_frame" and message.startswith("bad_dims:"), message
    code, _ = _error(_answer(rpc, _request(model_hash, 2, position=100, session=session)))
    assert code == "unknown_session"
    assert not worker.sessions
    # The same session, well-formed from position 0, is then served.
    assert _answer(rpc, _request(model_hash, 2, session=session)).kind is frames.FrameKind.RESPONSE
    assert list(worker.sessions) == [session]


def test_a_kv_jump_on_a_known_session_is_refused_and_keeps_its_kv(worker_edges: Any) -> None:
    worker, (rpc, _), model_hash = worker_edges
    session = uuid.uuid4()
    assert _answer(rpc, _request(model_hash, 3, session=session)).kind is frames.FrameKind.RESPONSE
    code, _ = _error(_answer(rpc, _request(model_hash, 1, position=5000, session=session, step=1)))
    assert code == "unknown_session"
    assert worker.sessions[session].session.cached(0, 0) == 3
    ok = _answer(rpc, _request(model_hash, 1, position=3, session=session, step=1))
    assert ok.kind is frames.FrameKind.RESPONSE


# --- defect 4: frames per second per device -----------------------------------------------------


@pytest.mark.parametrize(
    "worker_edges", [{"max_frames_per_s_per_device": 5.0, "frame_burst_per_device": 10}], indirect=True
)
def test_a_flooding_device_is_refused_while_another_is_served(worker_edges: Any) -> None:
    worker, (flood, other), model_hash = worker_edges
    ffn = [Op(OpKind.FFN, 1)]
    futures = [flood.request(topics.pool_segment_topic(POOL), _request(model_hash, 1, ops=ffn))[1] for _ in range(60)]
    replies = [frames.decode_frame(f.result(timeout=30).payload) for f in futures]
    refused = [f for f in replies if f.kind is frames.FrameKind.ERROR]
    served = [f for f in replies if f.kind is frames.FrameKind.RESPONSE]
    assert 10 <= len(served) <= 25 and len(refused) >= 35, (len(served), len(refused))
    code, message = refused[0].error()
    assert code == "overloaded" and "dev-a" in message and "frames/s" in message, message
    # The second device still gets its frames computed while the first one is throttled.
    for _ in range(5):
        assert _answer(other, _request(model_hash, 1, ops=ffn)).kind is frames.FrameKind.RESPONSE
    assert worker.stats.rate_limited == len(refused)


# --- oversized messages and a full inbox are refused on arrival, never queued -----------------------


def test_a_message_larger_than_any_computable_frame_is_refused_undecoded(worker_edges: Any) -> None:
    worker, (rpc, _), model_hash = worker_edges
    assert worker.max_frame_bytes < 4 << 20  # 512 rows of n_ff = 1536 floats, plus headers
    big = _request(model_hash, 2_000)  # a well-formed 4.6 MB frame
    code, message = _error(_answer(rpc, big))
    assert code == "bad_frame" and message.startswith("too_large: "), message
    code, message = _error(_answer(rpc, bytes(20 << 20)))  # 20 MB of zeros
    assert code == "bad_frame" and message.startswith("too_large: "), message
    assert worker.stats.requests == 0 and worker.stats.refused_on_arrival == 2


@pytest.mark.parametrize("worker_edges", [{"max_queued_bytes": 100_000}], indirect=True)
def test_frames_beyond_the_queued_bytes_are_refused_while_the_worker_is_busy(worker_edges: Any) -> None:
    worker, (rpc, other), model_hash = worker_edges
    release, busy = threading.Event(), threading.Event()
    original = worker.handle

    def slow(msg: Any, queued_s: float = 0.0) -> None:
        busy.set()
        release.wait(30)
        original(msg, queued_s)

    worker.handle = slow  # type: ignore[method-assign]
    ffn = [Op(OpKind.FFN, 1)]
    frame = _request(model_hash, 17, ops=ffn)  # ~39 kB: two fit in 100 kB
    topic = topics.pool_segment_topic(POOL)
    first = rpc.request(topic, frame)[1]
    assert busy.wait(10)  # the first one is being handled, out of the inbox
    waiting = [other.request(topic, _request(model_hash, 17, ops=ffn))[1] for _ in range(5)]
    refused = [frames.decode_frame(f.result(timeout=10).payload) for f in waiting[2:]]
    assert all(f.error()[0] == "overloaded" and "worker busy" in f.error()[1] for f in refused)
    release.set()
    for future in [first, *waiting[:2]]:
        assert frames.decode_frame(future.result(timeout=30).payload).kind is frames.FrameKind.RESPONSE
    assert worker._queued_bytes == 0 and worker.stats.refused_on_arrival == 3


# --- defect 5: SIGTERM with no broker -----------------------------------------------------------


def _serve(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "cloud_offload.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigterm_without_a_broker_exits_0_without_a_traceback(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    proc = _serve(
        "--broker", f"mqtt://127.0.0.1:{port}", "--model", str(bundled_model_path()), "--profile", "off",
        "--worker-id", "w-nobroker",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        lines: list[str] = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "cannot connect to the broker" in line or not line:
                break
        # Started, and disconnected (it says "serving pool" only once the broker has connected).
        assert any("cannot connect to the broker" in line for line in lines), "".join(lines)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stderr = "".join(lines) + err
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 0, stderr


# --- defect 6: no llama.cpp context warning at start --------------------------------------------


def test_loading_the_tokenizer_and_engine_prints_no_llama_cpp_warning() -> None:
    code = (
        "from splitwise_core.engine import Engine\n"
        "from splitwise_core.tokenizer import bundled_model_path\n"
        "e = Engine(bundled_model_path())\n"
        "assert e.tokenizer.decode(e.tokenizer.encode('Hello world')) == 'Hello world'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "n_ctx" not in done.stderr and "llama_context" not in done.stderr, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_llama_cpp_errors_are_still_reported(tmp_path: Path) -> None:
    """Silencing the warning must not hide real errors: a corrupt GGUF still says why on stderr."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    code = (
        "import sys\n"
        "from splitwise_core.errors import ModelFileError\n"
        "from splitwise_core.tokenizer import Tokenizer\n"
        f"try:\n    Tokenizer({str(bad)!r})\nexcept ModelFileError as err:\n    print('refused', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.startswith("refused"), done.stdout + done.stderr
    assert "failed to load model" in done.stderr or "bad GGUF version" in done.stderr, done.stderr
