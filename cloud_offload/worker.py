"""The cloud worker: runs the offloaded segments of edge devices' plans.

Sessions arrive through the pool's shared subscription; once a worker holds a session's KV the
edge talks to it on its own topic (affinity). Frames are validated before anything runs; a bad
frame gets an error reply (when it names a reply topic) and the worker keeps serving. QoS 1
redeliveries and edge retries of a segment are answered from the stored response instead of
being computed twice (at most ``4·n_layer + 16`` answers per session, newest step only). Sessions
expire after a TTL and are evicted least-recently-used when their KV plus the answers they keep
exceed the memory cap.

The front door assumes anyone on the broker may publish to the pool: every limit is checked before
any work. As a message arrives, before it is even decoded: beyond its device's rate (token bucket
per device, named by the reply topic) or past the bytes the inbox may hold it is refused
``overloaded``, and larger than any frame this worker could compute ``bad_frame`` (``too_large``);
none of these is queued. A request is validated whole
before anything is created or computed: its tensor's shape against the model (2-D, the first op's
width), its rows against ``max_rows_per_frame`` and the model's context (``position + T``), its
payload (no NaN/Inf), and the session's KV history for every attention op; only then does the
session entry exist, and the KV cap makes room (evicting least recently used sessions) before the
frame's KV is added.

Link probes (``FrameKind.PROBE``) are answered at once with a reply of the requested size; they go
through the same inbox as segments (so their round trip includes queueing here) and never create
a session. At start the worker publishes its cost profile, retained, on
``splitwise/v1/cloud/{pool}/profile/{worker_id}`` (measured in a background thread while it serves,
or read from a file) and clears it when it stops.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt

from cloud_offload import profiles
from cloud_offload.config import (
    DEFAULT_FRAME_BURST_PER_DEVICE,
    DEFAULT_KV_MEMORY_CAP,
    DEFAULT_MAX_FRAMES_PER_S_PER_DEVICE,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_TTL_S,
)
from cloud_offload.mqtt import BrokerSettings, MqttConnection
from cloud_offload.protocol import frames, topics
from cloud_offload.protocol.frames import ErrorCode, Flags, Frame, FrameFault, FrameKind
from splitwise_core import __version__
from splitwise_core.engine import Model, Session, model_sha256
from splitwise_core.errors import FrameError, InvalidArgumentError, SplitwiseError
from splitwise_core.ops import HEADER_SIZE, OP_SIZE, OpKind
from splitwise_core.profile import load_profile_file, profile_problems
from splitwise_core.sampling import sample

_DEVICE_REPLY_TOPIC = re.compile(r"splitwise/v1/device/([A-Za-z0-9_-]{1,64})/reply/[^/]+")

log = logging.getLogger(__name__)

STOP = object()
ProfileSource = str | Path | Mapping[str, Any] | None
"""``"measure"``, ``"off"`` (or None), a profile JSON file, or the profile's JSON value itself."""


class _ProfilingCancelled(Exception):
    """Raised from the profiler's progress callback when the worker stops."""


@dataclass
class WorkerSession:
    session: Session
    last_used: float
    # The answers of the newest step, by segment id: what a duplicate or retry gets back.
    answered_step: int = -1
    answers: dict[int, bytes] = field(default_factory=dict)
    answer_bytes: int = 0  # their total size, counted against the memory cap

    def remember(self, step: int, segment: int, reply: bytes, most: int) -> None:
        """Keeps `reply` for retries of (step, segment): only the newest step's, at most `most`
        of them (the oldest goes first; a step of a real schedule has far fewer segments)."""
        if step != self.answered_step:
            self.answered_step, self.answers, self.answer_bytes = step, {}, 0
        old = self.answers.pop(segment, None)
        if old is not None:
            self.answer_bytes -= len(old)
        while len(self.answers) >= most:
            self.answer_bytes -= len(self.answers.pop(next(iter(self.answers))))
        self.answers[segment] = reply
        self.answer_bytes += len(reply)


@dataclass
class WorkerStats:
    requests: int = 0
    duplicates: int = 0
    errors: int = 0
    sessions_evicted: int = 0
    probes: int = 0
    rate_limited: int = 0  # frames refused by the per-device rate limit (never decoded)
    refused_on_arrival: int = 0  # larger than any frame this worker computes, or the inbox was full


class FrameRateLimiter:
    """Token buckets per sender: `rate` frames per second, up to `burst` at once. Thread-safe; idle
    senders' buckets are dropped once there are many, so made-up sender names cannot grow it."""

    MAX_SENDERS = 4096

    def __init__(self, rate: float, burst: int) -> None:
        if not rate > 0 or burst < 1:
            raise SplitwiseError(f"frame rate limit: rate must be > 0 and burst >= 1 (got {rate!r}, {burst!r})")
        self.rate, self.burst = float(rate), int(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, at)
        self._lock = threading.Lock()

    def allow(self, sender: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(sender, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[sender] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.MAX_SENDERS:
                full_after = self.burst / self.rate
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
            return allowed


def sender_of(reply_topic: str | None) -> str:
    """Who a frame comes from, for rate limiting: the device id of a device reply topic
    (``splitwise/v1/device/{id}/reply/{nonce}``: every connection of a device shares its budget),
    else the reply topic itself, else "" (frames without a reply topic share one budget)."""
    if reply_topic is None:
        return ""
    match = _DEVICE_REPLY_TOPIC.fullmatch(reply_topic)
    return f"device {match.group(1)}" if match else f"reply topic {reply_topic[:200]}"


class KvMismatch(SplitwiseError, ValueError):
    """This worker's KV for the session does not end where the frame's position starts."""


class CloudWorker:
    def __init__(
        self,
        model_path: str | Path,
        *,
        worker_id: str,
        pool: str,
        broker: BrokerSettings,
        threads: int = 1,
        session_ttl_s: float = DEFAULT_SESSION_TTL_S,
        kv_memory_cap: int = DEFAULT_KV_MEMORY_CAP,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        profile: ProfileSource = None,
        max_rows_per_frame: int = frames.DEFAULT_MAX_ROWS_PER_FRAME,
        max_frames_per_s_per_device: float = DEFAULT_MAX_FRAMES_PER_S_PER_DEVICE,
        frame_burst_per_device: int = DEFAULT_FRAME_BURST_PER_DEVICE,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        self.worker_id = topics.validate_id(worker_id, "worker id")
        self.pool = topics.validate_id(pool, "pool")
        self.model_path = Path(model_path)
        self.model = Model(str(self.model_path), threads)
        self.config = dict(self.model.config)
        self.model_hash = frames.model_hash_prefix(model_sha256(self.model_path))
        self.session_ttl_s = session_ttl_s
        self.kv_memory_cap = kv_memory_cap
        self.max_sessions = max_sessions
        if isinstance(max_rows_per_frame, bool) or not isinstance(max_rows_per_frame, int) or max_rows_per_frame < 1:
            raise SplitwiseError(f"max_rows_per_frame must be a positive integer, got {max_rows_per_frame!r}")
        self.max_rows_per_frame = max_rows_per_frame
        # A step of a compiled schedule has at most two segments per layer and the LM head; beyond
        # this, stored answers (kept for retries) are dropped oldest first.
        self.max_answers_per_session = 4 * int(self.config["n_layer"]) + 16
        self.rate_limiter = FrameRateLimiter(max_frames_per_s_per_device, frame_burst_per_device)
        if isinstance(max_queued_bytes, bool) or not isinstance(max_queued_bytes, int) or max_queued_bytes < 1:
            raise SplitwiseError(f"max_queued_bytes must be a positive integer, got {max_queued_bytes!r}")
        self.max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0  # payload bytes in the inbox (added on paho's thread, taken on ours)
        self._queued_lock = threading.Lock()
        # The largest message this worker could compute: every op, max_rows_per_frame rows of the
        # widest input (n_ff) in f32, the widest codec; or a probe.
        widest = max(int(self.config["n_embd"]), int(self.config["n_ff"]))
        self.max_frame_bytes = max(
            frames.MAX_PROBE_SIZE,
            HEADER_SIZE + frames.MAX_OPS * OP_SIZE + 1 + 4 * frames.MAX_DIMS + 4 + 4 * widest * max_rows_per_frame + 4,
        )
        self.sessions: OrderedDict[uuid.UUID, WorkerSession] = OrderedDict()
        self.stats = WorkerStats()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._status_topic = topics.worker_status_topic(self.worker_id)
        self.connection = MqttConnection(
            broker, f"splitwise-cloud-{self.worker_id}", will=(self._status_topic, self._status("offline"), True)
        )
        self.connection.add_on_connect(self._publish_status)
        self._compute = threading.Thread(target=self._compute_loop, name="segment-compute", daemon=True)
        self.threads = threads
        self._init_profile(profile)

    # --- the worker's cost profile (retained, per worker) --------------------------------------

    def _init_profile(self, source: ProfileSource) -> None:
        self.profile_topic = topics.worker_profile_topic(self.pool, self.worker_id)
        self._profile_lock = threading.Lock()
        self._profile_payload: bytes | None = None
        self._stopping = False
        # Set once the profile was published (or profiling failed / was cancelled); for callers and tests.
        self.profile_done = threading.Event()
        self.profile_seconds: float | None = None  # how long measuring took
        self._measure = False
        self._profile_mode = "off"
        if source is None or source == "off":
            self.profile_done.set()
            return
        if isinstance(source, Mapping):
            problems = profile_problems(dict(source))
            if problems:
                raise SplitwiseError(f"profile: {problems[0]}")
            self._profile_mode = "given"
            self._set_profile(dict(source), profiles.utc_now(), "given")
        elif source == "measure":
            self._profile_mode = "measure"
            self._measure = True
        else:
            path = Path(source)
            obj = load_profile_file(path)  # InvalidArgumentError saying what is wrong
            mtime = path.stat().st_mtime
            measured_at = _dt.datetime.fromtimestamp(mtime, _dt.UTC).isoformat(timespec="seconds")
            self._profile_mode = f"file {path}"
            self._set_profile(obj, measured_at, "file")
        self.connection.add_on_connect(self._publish_profile)

    def _set_profile(self, profile: dict[str, Any], measured_at: str, source: str) -> None:
        self._profile_payload = profiles.profile_message(
            worker_id=self.worker_id,
            pool=self.pool,
            model_hash=self.model_hash,
            threads=self.threads,
            profile=profile,
            measured_at=measured_at,
            source=source,
        )

    def _publish_profile(self) -> None:
        """On every (re)connect, and when measuring ends: a restarted broker may have lost it."""
        with self._profile_lock:
            if self._profile_payload is None or self._stopping:
                return
            self.connection.publish(self.profile_topic, self._profile_payload, retain=True)
            self.profile_done.set()

    def _measure_profile(self) -> None:
        def progress(i: int, n: int, label: str) -> None:
            if self._stopping:
                raise _ProfilingCancelled
            log.info("profiling this worker [%d/%d]: %s", i, n, label)

        started = time.perf_counter()
        log.info("profiling this worker (%d threads) while serving; the profile is published when done", self.threads)
        try:
            profile = profiles.measure_profile(self.model_path, self.threads, progress)
        except _ProfilingCancelled:
            log.info("profiling cancelled: the worker is stopping")
            self.profile_done.set()
            return
        except Exception:
            log.exception("profiling failed; this worker publishes no profile")
            self.profile_done.set()
            return
        self.profile_seconds = time.perf_counter() - started
        with self._profile_lock:
            if self._stopping:
                return
            self._set_profile(profile, profiles.utc_now(), "measured")
        log.info("profiled in %.1f s; publishing on %s", self.profile_seconds, self.profile_topic)
        self._publish_profile()

    def _status(self, state: str) -> bytes:
        return json.dumps(
            {
                "state": state,
                "worker_id": self.worker_id,
                "pool": self.pool,
                "version": __version__,
                "model_hash": self.model_hash.hex(),
                "sessions": len(self.sessions),
                "max_rows_per_frame": self.max_rows_per_frame,
            }
        ).encode()

    def _publish_status(self) -> None:
        self.connection.publish(self._status_topic, self._status("online"), retain=True)

    def start(self, connect_timeout: float | None = 10.0) -> None:
        self._compute.start()
        self.connection.subscribe(topics.pool_segment_share(self.pool), self._enqueue)
        self.connection.subscribe(topics.worker_segment_topic(self.worker_id), self._enqueue)
        self.connection.start(connect_timeout)
        if self._measure:
            threading.Thread(target=self._measure_profile, name="worker-profile", daemon=True).start()

    def stop(self) -> None:
        """Withdraws the profile, says ``offline``, stops computing and disconnects. Never raises:
        with the broker gone the two messages are not sent (the broker publishes the status topic's
        will message, ``offline``, once it notices) and the worker still stops cleanly."""
        with self._profile_lock:
            self._stopping = True
        if self._profile_mode != "off":
            # An empty retained message deletes the retained profile: devices drop this worker.
            self._publish_on_stop(self.profile_topic, b"")
        self._publish_on_stop(self._status_topic, self._status("offline"))
        self._inbox.put(STOP)
        self._compute.join(timeout=10)
        try:
            self.connection.stop()
        except Exception as err:  # stopping must finish whatever state the connection is in
            log.warning("disconnecting from the broker failed: %s", err)

    def _publish_on_stop(self, topic: str, payload: bytes) -> None:
        try:
            self.connection.publish(topic, payload, retain=True).wait_for_publish(2)
        except Exception as err:  # paho raises when it is not connected, among others
            log.info("stopping: %s not published (%s)", topic, err)

    # --- request handling (compute thread) -----------------------------------------------------

    def _enqueue(self, msg: mqtt.MQTTMessage) -> None:
        """On paho's thread, before the frame is even decoded: the per-device rate limit, the size
        of the largest frame this worker could compute, and the bytes waiting in the inbox."""
        reply_topic, correlation = _reply_address(msg)
        sender = sender_of(reply_topic)
        if not self.rate_limiter.allow(sender):
            self.stats.rate_limited += 1
            if self.stats.rate_limited & (self.stats.rate_limited - 1) == 0:  # 1st, 2nd, 4th, 8th … refusal
                log.warning(
                    "%s exceeds %g frames/s: refused %d frames so far",
                    sender or "no reply topic",
                    self.rate_limiter.rate,
                    self.stats.rate_limited,
                )
            message = (
                f"{sender or 'frames without a reply topic'}: more than {self.rate_limiter.rate:g} frames/s "
                f"(burst {self.rate_limiter.burst}); frame refused, send slower"
            )
            self._reply(reply_topic, correlation, frames.encode_error(ErrorCode.OVERLOADED, message))
            return
        size = len(msg.payload)
        if size > self.max_frame_bytes:
            self._refuse_on_arrival(
                msg,
                ErrorCode.BAD_FRAME,
                f"{FrameFault.TOO_LARGE}: {size} bytes; this worker computes frames of at most {self.max_frame_bytes} "
                f"bytes ({self.max_rows_per_frame} rows)",
            )
            return
        with self._queued_lock:
            queued = self._queued_bytes
            if queued + size <= self.max_queued_bytes:
                self._queued_bytes += size
        if queued + size > self.max_queued_bytes:
            self._refuse_on_arrival(
                msg,
                ErrorCode.OVERLOADED,
                f"worker busy: {queued} bytes of frames queued, at most {self.max_queued_bytes}; frame refused",
            )
            return
        self._inbox.put((time.perf_counter(), msg))

    def _refuse_on_arrival(self, msg: mqtt.MQTTMessage, code: str, message: str) -> None:
        self.stats.refused_on_arrival += 1
        if self.stats.refused_on_arrival & (self.stats.refused_on_arrival - 1) == 0:  # 1st, 2nd, 4th … refusal
            log.warning(
                "refused a frame on %s before decoding it: %s (%d so far)",
                msg.topic,
                message,
                self.stats.refused_on_arrival,
            )
        reply_topic, correlation = _reply_address(msg)
        self._reply(reply_topic, correlation, frames.encode_error(code, message))

    def _compute_loop(self) -> None:
        while True:
            try:
                # Wake up now and then even when idle, so expired sessions free their KV.
                item = self._inbox.get(timeout=min(5.0, self.session_ttl_s))
            except queue.Empty:
                self._expire_sessions()
                continue
            if item is STOP:
                return
            arrived, msg = item
            with self._queued_lock:
                self._queued_bytes -= len(msg.payload)
            try:
                self.handle(msg, queued_s=time.perf_counter() - arrived)
            except Exception:
                log.exception("segment handling failed")
            self._expire_sessions()

    def handle(self, msg: mqtt.MQTTMessage, queued_s: float = 0.0) -> None:
        """Validates and answers one message; `queued_s` is how long it waited in our inbox."""
        reply_topic, correlation = _reply_address(msg)
        try:
            frame = frames.decode_frame(
                msg.payload,
                n_layer=int(self.config["n_layer"]),
                n_head=int(self.config["n_head"]),
                model_hash=self.model_hash,
            )
        except FrameError as err:
            self.stats.errors += 1
            log.warning("dropped a bad frame on %s: %s", msg.topic, err)
            code = ErrorCode.MODEL_MISMATCH if err.reason == "model_mismatch" else ErrorCode.BAD_FRAME
            self._reply(reply_topic, correlation, frames.encode_error(code, str(err)), queued_s=queued_s)
            return
        if frame.kind is FrameKind.PROBE:
            # Answered at once; no session, no KV. Its round trip includes the wait in our inbox.
            started = time.perf_counter()
            self.stats.probes += 1
            answer = frames.encode_probe_reply(frame, len(msg.payload))
            self._reply(reply_topic, correlation, answer, compute_s=time.perf_counter() - started, queued_s=queued_s)
            return
        if frame.kind is not FrameKind.REQUEST:
            log.warning("dropped a %s frame sent to a worker", frame.kind.name)
            return
        started = time.perf_counter()
        reply = self.answer(frame)
        self._reply(reply_topic, correlation, reply, compute_s=time.perf_counter() - started, queued_s=queued_s)

    def answer(self, frame: Frame) -> bytes | None:
        """The reply frame for a request (None: a bare CLOSE, which gets no reply).

        The frame is checked whole before anything is created or computed: a frame that fails gets
        an error reply and leaves no trace (no session entry, no KV)."""
        self.stats.requests += 1
        state = self.sessions.get(frame.session)
        if state is not None and frame.step == state.answered_step and frame.segment in state.answers:
            self.stats.duplicates += 1
            return state.answers[frame.segment]
        if frame.flags & Flags.CLOSE and not frame.ops:
            self.sessions.pop(frame.session, None)
            return None
        try:
            x = self.check_request(frame)
            growth = self._check_history(None if state is None else state.session, frame, x.shape[0])
        except KvMismatch as err:
            return frames.encode_error(ErrorCode.UNKNOWN_SESSION, str(err), request=frame)
        except FrameError as err:
            self.stats.errors += 1
            log.warning("refused a request of session %s: %s", frame.session, err)
            return frames.encode_error(ErrorCode.BAD_FRAME, str(err), request=frame)
        self._make_room(frame.session, growth)
        if state is None:
            state = WorkerSession(self.model.new_session(), time.monotonic())
            self.sessions[frame.session] = state
        self.sessions.move_to_end(frame.session)
        state.last_used = time.monotonic()
        try:
            output = self.run_ops(state.session, frame, x)
            if frame.sampling is not None:  # the device asked for the token, not 4·vocab bytes of logits
                reply = frames.encode_response(frame, sample(output[-1], frame.sampling, frame.sample_index))
            else:
                reply = frames.encode_response(frame, output)
        except KvMismatch as err:
            return frames.encode_error(ErrorCode.UNKNOWN_SESSION, str(err), request=frame)
        except SplitwiseError as err:
            self.stats.errors += 1
            return frames.encode_error(ErrorCode.BAD_REQUEST, str(err), request=frame)
        state.remember(frame.step, frame.segment, reply, self.max_answers_per_session)
        if frame.flags & Flags.CLOSE:
            self.sessions.pop(frame.session, None)
        self._enforce_memory_cap()
        return reply

    def check_request(self, frame: Frame) -> npt.NDArray[np.float32]:
        """The request's input tensor, once the frame passed every check this worker can make
        before computing (FrameError otherwise), cheapest first: a 2-D tensor as wide as the first
        op's input, at most `max_rows_per_frame` rows, rows within the model's context, and a
        payload without NaN/Inf."""
        if len(frame.shape) != 2:
            raise FrameError(FrameFault.BAD_DIMS, f"expected a 2-D tensor (tokens × width), got shape {frame.shape}")
        rows, width = frame.shape
        wanted = int(self.config["n_ff" if frame.ops[0].kind is OpKind.FFN_DOWN else "n_embd"])
        if width != wanted:
            raise FrameError(
                FrameFault.BAD_DIMS, f"{frame.ops[0].kind.name} takes rows of width {wanted}, got shape {frame.shape}"
            )
        if rows > self.max_rows_per_frame:
            raise FrameError(
                FrameFault.TOO_MANY_ROWS,
                f"{rows} rows, this worker computes at most {self.max_rows_per_frame} per frame (send them in chunks)",
            )
        context = int(self.config["context_length"])
        if frame.position + rows > context:
            raise FrameError(
                FrameFault.POSITION_OUT_OF_RANGE,
                f"rows at positions {frame.position}…{frame.position + rows - 1}, the model's context holds {context}",
            )
        return frame.tensor()  # FrameError bad_payload for NaN/Inf

    def _attention_groups(self, frame: Frame) -> list[tuple[int, list[int]]]:
        """(layer, KV groups) read and extended by each attention op of the frame."""
        per_group = int(self.config["n_head"]) // int(self.config["n_head_kv"])
        groups = []
        for op in frame.ops:
            if op.kind is OpKind.ATTN_PART:
                groups.append((op.layer, sorted({h // per_group for h in op.heads})))
            elif op.kind is OpKind.LAYER:
                groups.append((op.layer, list(range(int(self.config["n_head_kv"])))))
        return groups

    def _check_history(self, session: Session | None, frame: Frame, rows: int) -> int:
        """KvMismatch unless the session's KV ends where every attention op of the frame starts
        (a new session: at position 0); else the KV bytes the frame will add (an estimate)."""
        new_rows = 0
        for layer, groups in self._attention_groups(frame):
            for group in groups:
                cached = 0 if session is None else session.cached(layer, group)
                if cached not in (frame.position, frame.position + rows):
                    holds = "no KV" if session is None else f"{cached} positions"
                    raise KvMismatch(
                        f"layer {layer} KV group {group}: this worker holds {holds} for session {frame.session}; "
                        f"the frame starts at {frame.position}"
                    )
                if cached == frame.position:
                    new_rows += rows
        return new_rows * 2 * int(self.config["head_dim"]) * 4  # K and V rows in f32

    def run_ops(
        self, session: Session, frame: Frame, x: npt.NDArray[np.float32] | None = None
    ) -> npt.NDArray[np.float32]:
        """Runs the frame's ops on `x` (default: its decoded tensor; call check_request first)."""
        if x is None:
            x = self.check_request(frame)
        positions = list(range(frame.position, frame.position + x.shape[0]))
        all_heads = list(range(int(self.config["n_head"])))
        m = self.model
        for op in frame.ops:
            if op.kind is OpKind.ATTN_PART:
                self._check_kv(session, op.layer, op.heads, frame.position, len(positions))
                x = m.attention(session, op.layer, list(op.heads), x, positions)
            elif op.kind is OpKind.FFN_DOWN:
                x = m.ffn(op.layer, "down", x)
            elif op.kind is OpKind.FFN:
                x = m.ffn(op.layer, "full", x)
            elif op.kind is OpKind.RESIDUAL_FFN:
                x = x + m.ffn(op.layer, "full", m.ffn_norm(op.layer, x))
            elif op.kind is OpKind.LAYER:
                self._check_kv(session, op.layer, all_heads, frame.position, len(positions))
                x = m.layer_fused(session, op.layer, x, positions)
            elif op.kind is OpKind.LM_HEAD:
                x = m.output_logits(x[-1:])
        return x

    def _check_kv(self, session: Session, layer: int, heads: Any, position: int, n: int) -> None:
        """Attention is only right over the whole history: the cache of every group these heads
        read must end at `position` (or already hold this step, when a sibling head set of the
        group ran it). Anything else means this worker lacks history, e.g. after a failover."""
        per_group = int(self.config["n_head"]) // int(self.config["n_head_kv"])
        for group in sorted({h // per_group for h in heads}):
            cached = session.cached(layer, group)
            if cached not in (position, position + n):
                raise KvMismatch(
                    f"layer {layer} KV group {group} holds {cached} positions; the frame starts at {position}"
                )

    def _reply(
        self,
        topic: str | None,
        correlation: bytes | None,
        payload: bytes | None,
        compute_s: float = 0.0,
        queued_s: float = 0.0,
    ) -> None:
        """`compute_us` and `queue_us` (the wait in our inbox behind other work) let the edge separate
        the network's share of a round trip from ours."""
        if topic is None or payload is None:
            return
        props = [
            ("worker_id", self.worker_id),
            ("compute_us", str(int(compute_s * 1e6))),
            ("queue_us", str(int(queued_s * 1e6))),
        ]
        try:
            self.connection.publish(topic, payload, correlation_data=correlation, user_properties=props)
        except InvalidArgumentError as err:  # a ResponseTopic no broker would take: one line, no traceback
            log.warning("reply dropped: %s", str(err)[:300])

    # --- session housekeeping ------------------------------------------------------------------

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self.sessions.items() if now - s.last_used > self.session_ttl_s]:
            del self.sessions[sid]
            self.stats.sessions_evicted += 1

    def memory_bytes(self) -> int:
        """What the cap bounds: every session's KV plus the answers it keeps for retries."""
        return sum(s.session.memory_bytes + s.answer_bytes for s in self.sessions.values())

    def kv_bytes(self) -> int:
        return sum(s.session.memory_bytes for s in self.sessions.values())

    def _make_room(self, keep: uuid.UUID, growth: int) -> None:
        """Before computing: evicts least recently used sessions (never `keep`) until the KV the
        frame adds fits under the cap with what stays. The session being served is never evicted,
        so it alone may exceed a cap smaller than one session's KV (bounded by the context)."""
        while self.memory_bytes() + growth > self.kv_memory_cap:
            victim = next((sid for sid in self.sessions if sid != keep), None)
            if victim is None:
                return
            del self.sessions[victim]
            self.stats.sessions_evicted += 1
            log.info(
                "evicted session %s to make room for %d bytes of KV (cap %d bytes)", victim, growth, self.kv_memory_cap
            )

    def _enforce_memory_cap(self) -> None:
        while len(self.sessions) > 1 and (
            self.memory_bytes() > self.kv_memory_cap or len(self.sessions) > self.max_sessions
        ):
            sid, _ = self.sessions.popitem(last=False)
            self.stats.sessions_evicted += 1
            log.info("evicted session %s (KV cap %d bytes)", sid, self.kv_memory_cap)


def _reply_address(msg: mqtt.MQTTMessage) -> tuple[str | None, bytes | None]:
    """The message's MQTT v5 ResponseTopic and CorrelationData (None when absent)."""
    props = msg.properties
    reply_topic = getattr(props, "ResponseTopic", None) if props else None
    correlation = getattr(props, "CorrelationData", None) if props else None
    return reply_topic, correlation
