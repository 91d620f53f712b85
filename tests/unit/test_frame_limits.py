"""The worker's per-frame checks without a broker: what `CloudWorker.answer` refuses before any work
(rows, context, shape, NaN, KV history), the per-device token bucket, the config keys, and a
`stop()` that never raises when the broker is gone."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_offload.config import load_cloud_config
from cloud_offload.local_broker import free_port
from cloud_offload.mqtt import BrokerSettings
from cloud_offload.protocol import frames, topics
from cloud_offload.protocol.frames import FrameKind
from cloud_offload.worker import CloudWorker, FrameRateLimiter, sender_of
from splitwise_core import codecs
from splitwise_core.config import ConfigError
from splitwise_core.engine import model_sha256
from splitwise_core.errors import SplitwiseError
from splitwise_core.ops import Op, OpKind
from splitwise_core.tokenizer import bundled_model_path

D, N_FF, CONTEXT = 576, 1536, 8192
MODEL_HASH = frames.model_hash_prefix(model_sha256(bundled_model_path()))


@pytest.fixture(scope="module")
def worker() -> Iterator[CloudWorker]:
    """Not started: `answer` needs no connection."""
    yield CloudWorker(
        bundled_model_path(),
        worker_id="wunit",
        pool="unit",
        broker=BrokerSettings("127.0.0.1", 1),
        max_rows_per_frame=32,
    )


@pytest.fixture(autouse=True)
def _fresh_sessions(worker: CloudWorker) -> None:
    worker.sessions.clear()


def request(
    rows: int = 1,
    *,
    width: int = D,
    position: int = 0,
    ops: list[Op] | None = None,
    session: uuid.UUID | None = None,
    shape: tuple[int, ...] | None = None,
    step: int = 0,
) -> frames.Frame:
    x = np.random.default_rng(rows).standard_normal(shape or (rows, width)).astype(np.float32)
    data = frames.encode_request(
        session=session or uuid.uuid4(),
        step=step,
        position=position,
        segment=0,
        model_hash=MODEL_HASH,
        ops=ops or [Op(OpKind.ATTN_PART, 0, (0, 1, 2))],
        tensor=x,
        codec="f32",
    )
    return frames.decode_frame(data, n_layer=30, n_head=9, model_hash=MODEL_HASH)


def refusal(worker: CloudWorker, frame: frames.Frame) -> tuple[str, str]:
    reply = worker.answer(frame)
    assert reply is not None
    decoded = frames.decode_frame(reply)
    assert decoded.kind is FrameKind.ERROR, "the frame was computed"
    assert (decoded.session, decoded.position) == (frame.session, frame.position)  # header echoed
    return decoded.error()


@pytest.mark.parametrize(
    ("frame_args", "fault"),
    [
        ({"rows": 33}, "too_many_rows"),
        ({"rows": 33, "ops": [Op(OpKind.FFN, 1)]}, "too_many_rows"),
        ({"rows": 4, "position": CONTEXT - 3}, "position_out_of_range"),
        ({"rows": 1, "position": CONTEXT}, "position_out_of_range"),
        ({"rows": 1, "position": 2**32 - 1, "ops": [Op(OpKind.FFN, 1)]}, "position_out_of_range"),
        ({"rows": 2, "width": D + 1}, "bad_dims"),
        ({"rows": 2, "width": D, "ops": [Op(OpKind.FFN_DOWN, 1)]}, "bad_dims"),  # FFN_DOWN takes n_ff
        ({"shape": (2, 3, D)}, "bad_dims"),
        ({"shape": (D,)}, "bad_dims"),
    ],
)
def test_refused_before_any_work_and_without_a_trace(
    worker: CloudWorker, frame_args: dict[str, Any], fault: str
) -> None:
    frame = request(**frame_args)
    code, message = refusal(worker, frame)
    assert code == "bad_frame" and message.startswith(f"{fault}: "), message
    assert not worker.sessions and worker.kv_bytes() == 0


def test_the_limits_themselves_are_served(worker: CloudWorker) -> None:
    reply = worker.answer(request(32, position=CONTEXT - 32))  # a new session: no KV, so unknown_session
    assert reply is not None and frames.decode_frame(reply).error()[0] == "unknown_session"
    assert not worker.sessions
    for frame in (request(32), request(32, width=N_FF, ops=[Op(OpKind.FFN_DOWN, 3)])):
        reply = worker.answer(frame)
        assert reply is not None and frames.decode_frame(reply).kind is FrameKind.RESPONSE


def test_a_nan_or_inf_payload_is_bad_frame_bad_payload(worker: CloudWorker) -> None:
    good = frames.encode_request(
        session=uuid.uuid4(),
        step=0,
        position=0,
        segment=0,
        model_hash=MODEL_HASH,
        ops=[Op(OpKind.FFN, 1)],
        tensor=np.ones((2, D), dtype=np.float32),
        codec="f32",
    )
    for value in (float("nan"), float("inf"), float("-inf")):
        body = good[:-8] + struct.pack("<f", value)
        frame = frames.decode_frame(body + struct.pack("<I", codecs.crc32c(body)), model_hash=MODEL_HASH)
        code, message = refusal(worker, frame)
        assert code == "bad_frame" and message.startswith("bad_payload: "), message
    assert not worker.sessions


def test_kv_history_is_checked_before_a_session_exists(worker: CloudWorker) -> None:
    session = uuid.uuid4()
    # Attention needs the history: an unknown session only from position 0.
    for ops in ([Op(OpKind.ATTN_PART, 4, (5,))], [Op(OpKind.LAYER, 7), Op(OpKind.LM_HEAD, 0)]):
        code, message = refusal(worker, request(2, position=40, ops=ops, session=session))
        assert code == "unknown_session" and "no KV" in message, message
    assert not worker.sessions
    # FFN-only frames hold no KV: served at any position (a plan with only FFNs on the cloud).
    reply = worker.answer(request(2, position=40, ops=[Op(OpKind.FFN, 2)], session=session))
    assert reply is not None and frames.decode_frame(reply).kind is FrameKind.RESPONSE
    assert session in worker.sessions and worker.kv_bytes() == 0


def test_a_kv_jump_on_a_known_session_leaves_its_kv_alone(worker: CloudWorker) -> None:
    session = uuid.uuid4()
    layer = [Op(OpKind.LAYER, 0)]
    assert worker.answer(request(3, ops=layer, session=session)) is not None
    before = worker.kv_bytes()
    code, message = refusal(worker, request(1, position=9, ops=layer, session=session, step=1))
    assert code == "unknown_session" and "holds 3 positions" in message, message
    assert worker.kv_bytes() == before and worker.sessions[session].session.cached(0, 2) == 3
    reply = worker.answer(request(1, position=3, ops=layer, session=session, step=1))  # where it ends: served
    assert reply is not None and frames.decode_frame(reply).kind is FrameKind.RESPONSE


def test_answers_kept_for_retries_are_bounded_and_count_against_the_cap(worker: CloudWorker) -> None:
    """One session's step with thousands of distinct segment ids must not pile up replies (each up
    to max_rows × d floats) outside the memory cap."""
    session, most = uuid.uuid4(), worker.max_answers_per_session
    assert most == 4 * 30 + 16
    for segment in range(most + 20):
        frame = frames.encode_request(
            session=session,
            step=0,
            position=0,
            segment=segment,
            model_hash=MODEL_HASH,
            ops=[Op(OpKind.FFN, 1)],
            tensor=np.ones((4, D), dtype=np.float32),
            codec="f32",
        )
        worker.answer(frames.decode_frame(frame, model_hash=MODEL_HASH))
    state = worker.sessions[session]
    assert len(state.answers) == most and min(state.answers) == 20  # the oldest went first
    assert state.answer_bytes == sum(len(a) for a in state.answers.values())
    assert worker.memory_bytes() == worker.kv_bytes() + state.answer_bytes > 0
    # A retry of a kept segment is answered from memory; of a dropped one, computed again.
    duplicates = worker.stats.duplicates
    assert worker.answer(frames.decode_frame(frame, model_hash=MODEL_HASH)) == state.answers[most + 19]
    assert worker.stats.duplicates == duplicates + 1
    dropped = request(4, ops=[Op(OpKind.FFN, 1)], session=session)  # step 0, segment 0
    assert worker.answer(dropped) is not None and worker.stats.duplicates == duplicates + 1


def test_the_status_message_names_the_row_limit(worker: CloudWorker) -> None:
    assert b'"max_rows_per_frame": 32' in worker._status("online")


# --- the token bucket ------------------------------------------------------------------------------


def test_token_bucket_burst_refill_and_independent_senders() -> None:
    limiter = FrameRateLimiter(rate=2.0, burst=5)
    assert [limiter.allow("a", now=100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", now=100.0)  # another device is not affected
    assert not limiter.allow("a", now=100.25)  # half a token
    assert [limiter.allow("a", now=101.0) for _ in range(3)] == [True, True, False]  # 0.5 + 0.75 s · 2/s
    assert sum(limiter.allow("a", now=200.0) for _ in range(10)) == 5  # refills to the burst, no more


def test_token_bucket_forgets_idle_senders_when_there_are_many() -> None:
    limiter = FrameRateLimiter(rate=1000.0, burst=2)
    for i in range(FrameRateLimiter.MAX_SENDERS + 1):
        limiter.allow(f"s{i}", now=0.0)
    limiter.allow("late", now=10.0)
    assert len(limiter._buckets) == 1


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 5), (-1.0, 5), (float("nan"), 5), (1.0, 0)])
def test_token_bucket_rejects_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(SplitwiseError, match="rate must be > 0 and burst >= 1"):
        FrameRateLimiter(rate, burst)


def test_sender_of_a_frame() -> None:
    assert sender_of(topics.device_reply_topic("pi5-kitchen", "abc")) == "device pi5-kitchen"
    assert sender_of("edge/reply/x") == "reply topic edge/reply/x"
    assert sender_of("splitwise/v1/device/a/reply/b/c") == "reply topic splitwise/v1/device/a/reply/b/c"
    assert sender_of(None) == ""
    assert len(sender_of("t" * 70000)) < 300


# --- config ---------------------------------------------------------------------------------------


def test_config_keys_defaults_and_errors(tmp_path: Path) -> None:
    minimal = '[worker]\nid = "w1"\nmodel = "model.gguf"\n'
    path = tmp_path / "cloud.toml"
    path.write_text(minimal)
    w = load_cloud_config(path).worker
    assert (w.max_rows_per_frame, w.max_frames_per_s_per_device, w.frame_burst_per_device) == (512, 1000.0, 2000)
    assert w.max_queued_bytes == 256 << 20
    assert any("max_rows_per_frame=512" in line for line in load_cloud_config(path).summary())
    path.write_text(
        minimal
        + "max_rows_per_frame = 0\nmax_frames_per_s_per_device = 0\nframe_burst_per_device = 0\n"
        + 'max_queued_bytes = "0B"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_cloud_config(path)
    assert [line.removeprefix(f"{path}: ") for line in info.value.problems] == [
        "worker.max_rows_per_frame: must be >= 1 (got 0)",
        "worker.max_frames_per_s_per_device: must be > 0 (got 0)",
        "worker.frame_burst_per_device: must be >= 1 (got 0)",
        "worker.max_queued_bytes: must be >= 1 (got 0)",
    ]


def test_worker_rejects_a_bad_row_limit() -> None:
    with pytest.raises(SplitwiseError, match="max_rows_per_frame must be a positive integer"):
        CloudWorker(
            bundled_model_path(), worker_id="w", pool="p", broker=BrokerSettings("127.0.0.1", 1), max_rows_per_frame=0
        )


# --- stop() with the broker gone ----------------------------------------------------------------------


class _FailingInfo:
    def wait_for_publish(self, timeout: float | None = None) -> bool:
        raise RuntimeError("Message publish failed: The client is not currently connected.")


@pytest.mark.parametrize("failure", ["wait", "publish"])
def test_stop_never_raises_when_the_broker_is_gone(failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w = CloudWorker(
        bundled_model_path(),
        worker_id="wgone",
        pool="unit",
        broker=BrokerSettings("127.0.0.1", free_port()),
    )
    w.start(connect_timeout=None)  # nothing listens there

    def publish(*_args: Any, **_kw: Any) -> _FailingInfo:
        if failure == "publish":
            raise RuntimeError("the client is gone")
        return _FailingInfo()

    monkeypatch.setattr(w.connection, "publish", publish)
    w.stop()  # must not raise
    assert not w._compute.is_alive()
