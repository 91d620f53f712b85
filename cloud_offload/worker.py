"""The cloud worker: runs the offloaded segments of edge devices' plans.

Sessions arrive through the pool's shared subscription; once a worker holds a session's KV the
edge talks to it on its own topic (affinity). Frames are validated before anything runs; a bad
frame gets an error reply (when it names a reply topic) and the worker keeps serving. QoS 1
redeliveries and edge retries of a segment are answered from the stored response instead of
being computed twice. Sessions expire after a TTL and are evicted least-recently-used when their
KV exceeds the memory cap.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt

from cloud_offload import protocol
from cloud_offload.mqtt import BrokerSettings, MqttConnection
from cloud_offload.protocol import ErrorCode, Flags, Frame, FrameKind, OpKind
from splitwise_device import __version__
from splitwise_device.engine import Model, Session, model_sha256
from splitwise_device.errors import FrameError, SplitwiseError

log = logging.getLogger(__name__)

STOP = object()


@dataclass
class WorkerSession:
    session: Session
    last_used: float
    # The answers of the newest step, by segment id: what a duplicate or retry gets back.
    answered_step: int = -1
    answers: dict[int, bytes] = field(default_factory=dict)


@dataclass
class WorkerStats:
    requests: int = 0
    duplicates: int = 0
    errors: int = 0
    sessions_evicted: int = 0


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
        session_ttl_s: float = 300.0,
        kv_memory_cap: int = 512 << 20,
        max_sessions: int = 256,
    ) -> None:
        self.worker_id = protocol.validate_id(worker_id, "worker id")
        self.pool = protocol.validate_id(pool, "pool")
        self.model_path = Path(model_path)
        self.model = Model(str(self.model_path), threads)
        self.config = dict(self.model.config)
        self.model_hash = protocol.model_hash_prefix(model_sha256(self.model_path))
        self.session_ttl_s = session_ttl_s
        self.kv_memory_cap = kv_memory_cap
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[uuid.UUID, WorkerSession] = OrderedDict()
        self.stats = WorkerStats()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._status_topic = protocol.worker_status_topic(self.worker_id)
        self.connection = MqttConnection(
            broker, f"splitwise-cloud-{self.worker_id}", will=(self._status_topic, self._status("offline"), True)
        )
        self.connection.add_on_connect(self._publish_status)
        self._compute = threading.Thread(target=self._compute_loop, name="segment-compute", daemon=True)

    def _status(self, state: str) -> bytes:
        return json.dumps(
            {
                "state": state,
                "worker_id": self.worker_id,
                "pool": self.pool,
                "version": __version__,
                "model_hash": self.model_hash.hex(),
                "sessions": len(self.sessions),
            }
        ).encode()

    def _publish_status(self) -> None:
        self.connection.publish(self._status_topic, self._status("online"), retain=True)

    def start(self, connect_timeout: float | None = 10.0) -> None:
        self._compute.start()
        self.connection.subscribe(protocol.pool_segment_share(self.pool), self._inbox.put)
        self.connection.subscribe(protocol.worker_segment_topic(self.worker_id), self._inbox.put)
        self.connection.start(connect_timeout)

    def stop(self) -> None:
        self.connection.publish(self._status_topic, self._status("offline"), retain=True).wait_for_publish(2)
        self._inbox.put(STOP)
        self._compute.join(timeout=10)
        self.connection.stop()

    # --- request handling (compute thread) -----------------------------------------------------

    def _compute_loop(self) -> None:
        while True:
            try:
                # Wake up now and then even when idle, so expired sessions free their KV.
                msg = self._inbox.get(timeout=min(5.0, self.session_ttl_s))
            except queue.Empty:
                self._expire_sessions()
                continue
            if msg is STOP:
                return
            try:
                self.handle(msg)
            except Exception:
                log.exception("segment handling failed")
            self._expire_sessions()

    def handle(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        reply_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        try:
            frame = protocol.decode_frame(
                msg.payload,
                n_layer=int(self.config["n_layer"]),
                n_head=int(self.config["n_head"]),
                model_hash=self.model_hash,
            )
        except FrameError as err:
            self.stats.errors += 1
            log.warning("dropped a bad frame on %s: %s", msg.topic, err)
            code = ErrorCode.MODEL_MISMATCH if err.reason == "model_mismatch" else ErrorCode.BAD_FRAME
            self._reply(reply_topic, correlation, protocol.encode_error(code, str(err)))
            return
        if frame.kind is not FrameKind.REQUEST:
            log.warning("dropped a %s frame sent to a worker", frame.kind.name)
            return
        started = time.perf_counter()
        reply = self.answer(frame)
        self._reply(reply_topic, correlation, reply, compute_s=time.perf_counter() - started)

    def answer(self, frame: Frame) -> bytes | None:
        """The reply frame for a request (None: a bare CLOSE, which gets no reply)."""
        self.stats.requests += 1
        state = self.sessions.get(frame.session)
        if state is not None and frame.step == state.answered_step and frame.segment in state.answers:
            self.stats.duplicates += 1
            return state.answers[frame.segment]
        if frame.flags & Flags.CLOSE and not frame.ops:
            self.sessions.pop(frame.session, None)
            return None
        if state is None:
            state = WorkerSession(self.model.new_session(), time.monotonic())
            self.sessions[frame.session] = state
        self.sessions.move_to_end(frame.session)
        state.last_used = time.monotonic()
        try:
            output = self.run_ops(state.session, frame)
            reply = protocol.encode_response(frame, output)
        except KvMismatch as err:
            return protocol.encode_error(ErrorCode.UNKNOWN_SESSION, str(err), request=frame)
        except SplitwiseError as err:
            self.stats.errors += 1
            return protocol.encode_error(ErrorCode.BAD_REQUEST, str(err), request=frame)
        if frame.step != state.answered_step:
            state.answered_step, state.answers = frame.step, {}
        state.answers[frame.segment] = reply
        if frame.flags & Flags.CLOSE:
            self.sessions.pop(frame.session, None)
        self._enforce_memory_cap()
        return reply

    def run_ops(self, session: Session, frame: Frame) -> npt.NDArray[np.float32]:
        x = frame.tensor()
        if x.ndim != 2:
            raise FrameError("bad_dims", f"expected a 2-D tensor (tokens × width), got shape {x.shape}")
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
        self, topic: str | None, correlation: bytes | None, payload: bytes | None, compute_s: float = 0.0
    ) -> None:
        """`compute_us` lets the edge separate the network's share of a round trip from ours."""
        if topic is None or payload is None:
            return
        props = [("worker_id", self.worker_id), ("compute_us", str(int(compute_s * 1e6)))]
        self.connection.publish(topic, payload, correlation_data=correlation, user_properties=props)

    # --- session housekeeping ------------------------------------------------------------------

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self.sessions.items() if now - s.last_used > self.session_ttl_s]:
            del self.sessions[sid]
            self.stats.sessions_evicted += 1

    def kv_bytes(self) -> int:
        return sum(s.session.memory_bytes for s in self.sessions.values())

    def _enforce_memory_cap(self) -> None:
        while len(self.sessions) > 1 and (
            self.kv_bytes() > self.kv_memory_cap or len(self.sessions) > self.max_sessions
        ):
            sid, _ = self.sessions.popitem(last=False)
            self.stats.sessions_evicted += 1
            log.info("evicted session %s (KV cap %d bytes)", sid, self.kv_memory_cap)
