"""Runs a partition plan: local sub-blocks on the engine, cloud segments over MQTT, with recovery.

Per token step the compiled schedule (`policies.segments.Schedule`, compiled once by the caller)
is interpreted over named registers. A parallel section publishes its cloud request first, runs the
edge ops, then waits. Each cloud request is one `SegmentRequest` value that carries everything its
frame needs (step, position, segment, ops, codec bytes, reply codec); retries, failover and replay
re-send that same value. Every request that builds KV on the worker (attention heads, whole layers)
is kept as it is — a partition checkpoint is just a kept `SegmentRequest` — within a byte budget,
so a new worker can rebuild the session. Recovery (DESIGN §6):

1. no reply by the deadline → retry with exponential backoff and jitter (same worker);
2. a worker silent for `tries_per_worker` attempts is banned for `ban_s`; the session moves to
   whichever worker the pool's shared subscription picks, which answers ``unknown_session``; the
   checkpoints are replayed to it and the step resumes;
3. after `max_tries` attempts with no answer at all (no cloud), the request finishes edge-only,
   recomputing the missing KV locally.

Every such event is recorded and returned with the result.

The worker's time on a request (`compute_us` + `queue_us`, strings only because MQTT user
properties are) is parsed once, where the reply arrives, into float seconds
(`cloud_offload.probe.worker_time_s`).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt

from cloud_offload.mqtt import RpcClient, user_property
from cloud_offload.probe import worker_time_s
from cloud_offload.protocol import frames, topics
from cloud_offload.protocol.frames import EncodedTensor, ErrorCode, Flags, FrameKind
from policies.plan import Plan
from policies.segments import (
    CloudSegment,
    EdgeOp,
    EdgeOpKind,
    LocalStep,
    ModelDims,
    ParallelSection,
    Reg,
    Schedule,
)
from splitwise_core.engine import Model, Session, random_seed
from splitwise_core.errors import FrameError, InvalidArgumentError, SplitwiseError
from splitwise_core.ops import Op, OpKind
from splitwise_core.sampling import SampledToken, Sampling, sample
from splitwise_device.estimators import LinkEstimator

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
KV_OPS = (OpKind.ATTN_PART, OpKind.LAYER)


class CloudUnavailableError(SplitwiseError, ConnectionError):
    """No cloud worker answered within the retry budget."""


@dataclass(frozen=True)
class RecoveryPolicy:
    segment_timeout_s: float = 5.0
    base_s: float = 0.1
    factor: float = 2.0
    cap_s: float = 2.0
    jitter: float = 0.2
    max_tries: int = 6
    tries_per_worker: int = 2
    ban_s: float = 30.0
    checkpoint_budget_bytes: int = 64 << 20

    def backoff(self, attempt: int, rng: random.Random) -> float:
        delay = min(self.cap_s, self.base_s * self.factor**attempt)
        return delay * (1 + self.jitter * (2 * rng.random() - 1))


@dataclass
class RecoveryEvent:
    kind: str  # retry | worker_banned | failover | replay | edge_fallback | worker_error
    step: int
    segment: int
    detail: str
    worker: str | None = None
    at_s: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "segment": self.segment,
            "worker": self.worker,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class SegmentRequest:
    """One cloud segment of one wire step, exactly as its frame carries it. The first send, every
    retry and a failover's replay publish this same value (with their own attempt and flags); one
    that builds KV on the worker is also kept as a partition checkpoint."""

    step: int
    position: int
    segment: int  # the schedule's segment index (the frame's segment id)
    ops: tuple[Op, ...]
    tensor: EncodedTensor
    reply_codec: str
    # A segment ending in LM_HEAD during generation: the worker samples (reply codec token).
    sampling: Sampling | None = None
    sample_index: int = 0

    @property
    def builds_kv(self) -> bool:
        return any(op.kind in KV_OPS for op in self.ops)

    @property
    def key(self) -> tuple[int, int]:
        """(step, segment): the order of requests within a session."""
        return self.step, self.segment


@dataclass
class TransferStats:
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    round_trip_s: list[float] = field(default_factory=list)
    cloud_compute_s: float = 0.0  # what the workers report (`compute_us` + `queue_us`) for the replies received


class CloudLink:
    """One session's conversation with the cloud pool: affinity, retries, checkpoints, failover."""

    def __init__(
        self,
        rpc: RpcClient,
        pool: str,
        model_hash: bytes,
        codec: str,
        policy: RecoveryPolicy,
        *,
        banned: dict[str, float] | None = None,
        rng: random.Random | None = None,
        link_estimator: LinkEstimator | None = None,
    ) -> None:
        self.rpc = rpc
        self.pool = pool
        self.model_hash = model_hash
        self.codec = codec
        self.policy = policy
        self.session = uuid.uuid4()
        self.worker: str | None = None
        self.banned = banned if banned is not None else {}
        self.rng = rng or random.Random()
        self.checkpoints: list[SegmentRequest] = []
        self.checkpoint_bytes = 0
        self.checkpoints_complete = True
        self.events: list[RecoveryEvent] = []
        self.stats = TransferStats()
        self.used = False
        self.link_estimator = link_estimator
        self._request_bytes: dict[bytes, int] = {}

    def _topic(self) -> str:
        if self.worker is not None and self.banned.get(self.worker, 0.0) <= time.monotonic():
            return topics.worker_segment_topic(self.worker)
        return topics.pool_segment_topic(self.pool)

    def segment_request(
        self,
        step: int,
        position: int,
        segment: CloudSegment,
        x: Array,
        sampling: Sampling | None = None,
        sample_index: int = 0,
    ) -> SegmentRequest:
        """The request for `segment` of this wire step with input `x` (encoded in the link's codec).
        A segment ending in the LM head answers with the token sampled under `sampling` for
        generated token `sample_index`, or, without `sampling`, with the f32 logits."""
        if segment.output is not Reg.LOGITS:
            sampling, reply_codec = None, self.codec
        else:
            reply_codec = "f32" if sampling is None else frames.TOKEN
        return SegmentRequest(
            step=step,
            position=position,
            segment=segment.index,
            ops=segment.ops,
            tensor=frames.encode_tensor(x, self.codec),
            reply_codec=reply_codec,
            sampling=sampling,
            sample_index=sample_index,
        )

    def send(self, request: SegmentRequest) -> Callable[[], Array | SampledToken]:
        """Publishes the request now; the returned callable waits for (and recovers) its answer."""
        self.used = True
        first = self._publish(request, attempt=0, flags=0)
        if request.builds_kv:
            self._keep_checkpoint(request)
        return lambda: self._await(request, first)

    def _publish(
        self, request: SegmentRequest, *, attempt: int, flags: int
    ) -> tuple[float, Future[mqtt.MQTTMessage], bytes]:
        frame = frames.encode_request(
            session=self.session,
            step=request.step,
            position=request.position,
            segment=request.segment,
            model_hash=self.model_hash,
            ops=request.ops,
            tensor=request.tensor,
            reply_codec=request.reply_codec,
            sampling=request.sampling,
            sample_index=request.sample_index,
            attempt=attempt,
            flags=flags,
        )
        correlation, future = self.rpc.request(self._topic(), frame, expiry_s=self.policy.segment_timeout_s * 4)
        self.stats.requests += 1
        self.stats.bytes_up += len(frame)
        self._request_bytes[correlation] = len(frame)
        return time.monotonic(), future, correlation

    def _await(
        self, request: SegmentRequest, first: tuple[float, Future[mqtt.MQTTMessage], bytes]
    ) -> Array | SampledToken:
        step, segment = request.step, request.segment
        sent_at, future, correlation = first
        silent_tries = 0
        tries, failovers = self.policy.max_tries, 0
        for attempt in itertools.count():
            if attempt >= tries:
                break
            if attempt > 0:
                time.sleep(self.policy.backoff(attempt - 1, self.rng))
                sent_at, future, correlation = self._publish(request, attempt=attempt, flags=0)
            try:
                msg = future.result(timeout=self.policy.segment_timeout_s)
            except FutureTimeout:
                self.rpc.cancel(correlation)
                self._request_bytes.pop(correlation, None)
                silent_tries += 1
                self.events.append(RecoveryEvent("retry", step, segment, f"no reply to attempt {attempt}", self.worker))
                if silent_tries >= self.policy.tries_per_worker and self.worker is not None:
                    self._ban(request)
                    silent_tries = 0
                continue
            round_trip = time.monotonic() - sent_at
            self.stats.round_trip_s.append(round_trip)
            self.stats.bytes_down += len(msg.payload)
            answered_by = user_property(msg, "worker_id")
            self._observe_link(correlation, len(msg.payload), round_trip, worker_time_s(msg))
            try:
                frame = frames.decode_frame(msg.payload)
            except FrameError as err:
                self.events.append(RecoveryEvent("worker_error", step, segment, str(err), answered_by))
                continue
            if answered_by is not None:
                # It answered, so it is not silent (any more): lift its ban. A banned worker still
                # gets pool messages from the shared subscription; while banned, `_topic()` would
                # send this session's later segments — and a failover's replay — back to the pool,
                # scattering them over workers that lack the session's KV.
                self.banned.pop(answered_by, None)
            if frame.kind is FrameKind.ERROR:
                code, message = frame.error()
                if code == ErrorCode.UNKNOWN_SESSION and answered_by is not None:
                    self._failover(answered_by, request)
                    # The replay just rebuilt the session on a worker that answers: its resend gets a
                    # try of its own instead of being cut off by the budget the silence used up
                    # (at most max_tries extra, so a worker that keeps refusing cannot loop forever).
                    if failovers < self.policy.max_tries:
                        failovers += 1
                        tries += 1
                    continue
                raise CloudUnavailableError(f"worker {answered_by} refused segment {segment}: {code}: {message}")
            if answered_by is not None and answered_by != self.worker:
                if self.worker is not None:
                    self.events.append(
                        RecoveryEvent("failover", step, segment, "answered by a new worker", answered_by)
                    )
                self.worker = answered_by
            try:
                return frame.sampled() if request.sampling is not None else frame.tensor()
            except FrameError as err:  # a codec other than asked, or a payload that does not decode
                self.events.append(RecoveryEvent("worker_error", step, segment, str(err), answered_by))
                continue
        raise CloudUnavailableError(
            f"segment {segment} of step {step}: no worker answered {self.policy.max_tries} tries"
        )

    def _observe_link(self, correlation: bytes, bytes_down: int, round_trip: float, worker_s: float | None) -> None:
        """`worker_s`: the worker's reported time in seconds (`worker_time_s`), None if it reported none."""
        bytes_up = self._request_bytes.pop(correlation, 0)
        compute_s = min(worker_s or 0.0, round_trip)
        self.stats.cloud_compute_s += compute_s
        if self.link_estimator is None:
            return
        self.link_estimator.observe(bytes_up, bytes_down, round_trip, compute_s)

    def _ban(self, request: SegmentRequest) -> None:
        assert self.worker is not None
        self.banned[self.worker] = time.monotonic() + self.policy.ban_s
        detail = f"silent; banned for {self.policy.ban_s:g}s"
        self.events.append(RecoveryEvent("worker_banned", request.step, request.segment, detail, self.worker))
        self.worker = None

    def _keep_checkpoint(self, checkpoint: SegmentRequest) -> None:
        size = len(checkpoint.tensor.data)
        if self.checkpoint_bytes + size > self.policy.checkpoint_budget_bytes:
            # Past the budget a new worker cannot be rebuilt; recovery then falls back to the edge.
            self.checkpoints_complete = False
            return
        self.checkpoints.append(checkpoint)
        self.checkpoint_bytes += size

    def _failover(self, worker: str, request: SegmentRequest) -> None:
        """Rebuilds the session's KV on `worker` by replaying every checkpoint sent before
        `request` — each with its own position — then lets the caller resend `request`."""
        if not self.checkpoints_complete:
            raise CloudUnavailableError("partition checkpoints exceeded their budget; cannot rebuild a worker")
        self.worker = worker
        replay = [c for c in self.checkpoints if c.key < request.key]
        self.events.append(RecoveryEvent("replay", request.step, request.segment, f"{len(replay)} checkpoints", worker))
        pending = [self._publish(c, attempt=0, flags=Flags.REPLAY) for c in replay]
        for _sent, future, correlation in pending:
            self._request_bytes.pop(correlation, None)
            try:
                msg = future.result(timeout=self.policy.segment_timeout_s)
            except FutureTimeout:
                self.rpc.cancel(correlation)
                raise CloudUnavailableError(f"worker {worker} did not answer the checkpoint replay") from None
            frame = frames.decode_frame(msg.payload)
            if frame.kind is FrameKind.ERROR:
                raise CloudUnavailableError(f"worker {worker} rejected the checkpoint replay: {frame.error()}")

    def close(self) -> None:
        if self.used:
            frame = frames.encode_request(
                session=self.session,
                step=0,
                position=0,
                segment=0,
                model_hash=self.model_hash,
                ops=(),
                tensor=None,
                flags=Flags.CLOSE,
            )
            self.rpc.connection.publish(self._topic(), frame)


@dataclass
class StepTiming:
    step: int
    tokens: int
    seconds: float


@dataclass
class SplitResult:
    tokens: list[int]
    stop_reason: str
    plan: Plan
    steps: list[StepTiming]
    events: list[RecoveryEvent]
    transfer: TransferStats
    fell_back_to_edge: bool
    # Per generated token (the EOS that stopped generation included) when asked for log-probabilities.
    sampled: list[SampledToken] = field(default_factory=list)
    # Time in the edge's own ops (not waiting for the cloud) by EdgeOpKind name; a whole local
    # forward pass (edge-only, fallback) counts as "FORWARD".
    edge_compute_by_kind: dict[str, float] = field(default_factory=dict)

    @property
    def edge_compute_s(self) -> float:
        return sum(self.edge_compute_by_kind.values())


class SplitExecutor:
    """Generates tokens for one request under a compiled schedule (`policies.segments.Schedule`)."""

    def __init__(
        self,
        model: Model,
        eos_id: int,
        link_factory: Callable[[], CloudLink] | None,
        *,
        max_rows_per_frame: int = frames.DEFAULT_MAX_ROWS_PER_FRAME,
    ) -> None:
        if isinstance(max_rows_per_frame, bool) or not isinstance(max_rows_per_frame, int) or max_rows_per_frame < 1:
            raise SplitwiseError(f"max_rows_per_frame must be a positive integer, got {max_rows_per_frame!r}")
        self.model = model
        self.eos_id = eos_id
        self.dims = ModelDims.from_config(model.config)
        self.link_factory = link_factory
        # Workers refuse frames with more rows than their max_rows_per_frame, so a longer batch (a
        # prompt's prefill) goes as several wire steps of at most this many tokens each.
        self.max_rows_per_frame = max_rows_per_frame
        # The layers whose weights were last kept loaded for a plan (`_follow_plan`).
        self.retained_layers: tuple[int, ...] | None = None

    @classmethod
    def over_mqtt(
        cls,
        model: Model,
        eos_id: int,
        rpc: RpcClient,
        *,
        pool: str,
        model_hash: bytes,
        codec: str,
        policy: RecoveryPolicy,
        banned: dict[str, float] | None = None,
        link_estimator: LinkEstimator | None = None,
        max_rows_per_frame: int = frames.DEFAULT_MAX_ROWS_PER_FRAME,
    ) -> SplitExecutor:
        """The executor whose cloud segments go over `rpc` to `pool`: each request that needs the
        cloud gets a new `CloudLink` (session) in `codec` under `policy`. `banned` (worker id →
        monotonic time its ban ends) is shared by all those links as given (the same dict, so bans
        outlive a request); `link_estimator` is fed every segment's transfer."""
        shared_bans = banned if banned is not None else {}

        def new_link() -> CloudLink:
            return CloudLink(rpc, pool, model_hash, codec, policy, banned=shared_bans, link_estimator=link_estimator)

        return cls(model, eos_id, new_link, max_rows_per_frame=max_rows_per_frame)

    def _check_schedule(self, schedule: Schedule) -> None:
        if schedule.dims != self.dims:
            raise SplitwiseError(
                f"the schedule was compiled for a model with {schedule.dims}, this executor runs {self.dims}"
            )
        self._follow_plan(schedule.plan)

    def _follow_plan(self, plan: Plan) -> None:
        """Keeps the weights of the layers `plan` runs here loaded and unloads the rest, when the
        plan's edge layers changed (a model mapped under a memory budget; a no-op otherwise).
        Loading them here, before the first token, keeps the per-token path free of file loads.
        A plan whose edge layers' files exceed the budget still runs, with files loaded on
        demand (logged): the cost model counts the bytes a plan touches, which can be fewer."""
        layers = plan.edge_layers()
        if layers == self.retained_layers:
            return
        try:
            self.model.retain_layers(layers)
        except InvalidArgumentError as err:
            log.warning("plan %s: layer weights stay loaded on demand: %s", plan.name, err)
            layers = ()
            self.model.retain_layers(layers)
        self.retained_layers = layers

    def generate(
        self,
        prompt: Sequence[int],
        schedule: Schedule,
        max_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        logprobs: int = 0,
    ) -> SplitResult:
        """Up to `max_tokens` tokens after `prompt`, running `schedule` (`compile_plan(plan, dims)`,
        compiled once by the caller) every token step. Sampling follows `splitwise_core.sampling`
        wherever the LM head runs: a worker running it returns the token, not the logits."""
        self._check_schedule(schedule)
        sampling = Sampling(temperature, top_k, top_p, random_seed() if seed is None else seed, logprobs)
        sampled_tokens: list[SampledToken] = []
        link = self.link_factory() if schedule.cloud_round_trips and self.link_factory else None
        if schedule.cloud_round_trips and link is None:
            raise CloudUnavailableError("the plan needs the cloud but no broker is configured")
        session = self.model.new_session()
        history: list[int] = []
        batch, position, generated, timings = list(prompt), 0, [], []
        fell_back, stop = False, "max_tokens"
        edge_compute: dict[str, float] = {}
        wire_steps = itertools.count()  # a token step is one wire step per chunk of its batch
        try:
            for step in range(max_tokens):
                start = time.perf_counter()
                if link is not None and not fell_back:
                    try:
                        for chunk_start in range(0, len(batch), self.max_rows_per_frame):
                            chunk = batch[chunk_start : chunk_start + self.max_rows_per_frame]
                            wire_step = next(wire_steps)
                            chunk_position = position + chunk_start
                            out = self._step(
                                schedule, session, link, wire_step, chunk, chunk_position, edge_compute, sampling, step
                            )
                    except CloudUnavailableError as err:
                        link.events.append(RecoveryEvent("edge_fallback", step, -1, str(err)))
                        fell_back = True
                        session = self.model.new_session()
                        # Recompute everything the cloud held, locally: one prefill of the history.
                        batch, position = history + batch, 0
                if link is None or fell_back:
                    positions = list(range(position, position + len(batch)))
                    local_started = time.perf_counter()
                    out = self.model.forward(session, batch, positions)[-1]
                    elapsed = time.perf_counter() - local_started
                    edge_compute["FORWARD"] = edge_compute.get("FORWARD", 0.0) + elapsed
                timings.append(StepTiming(step, len(batch), time.perf_counter() - start))
                history += batch
                position += len(batch)
                chosen = out if isinstance(out, SampledToken) else sample(out, sampling, step)
                if logprobs:
                    sampled_tokens.append(chosen)
                token = chosen.token
                if token == self.eos_id:
                    stop = "eos"
                    break
                generated.append(token)
                if on_token is not None:
                    on_token(token)
                batch = [token]
        finally:
            if link is not None:
                link.close()
        return SplitResult(
            tokens=generated,
            stop_reason=stop,
            plan=schedule.plan,
            steps=timings,
            events=link.events if link else [],
            transfer=link.stats if link else TransferStats(),
            fell_back_to_edge=fell_back,
            sampled=sampled_tokens,
            edge_compute_by_kind=edge_compute,
        )

    def teacher_forced_logits(self, tokens: Sequence[int], schedule: Schedule) -> Array:
        """Logits after each of `tokens[:-1]`, fed one per step through the schedule (for perplexity
        and agreement measurements of a plan and codec); shape (len(tokens) - 1, vocab)."""
        self._check_schedule(schedule)
        link = self.link_factory() if schedule.cloud_round_trips and self.link_factory else None
        session = self.model.new_session()
        rows = []
        try:
            for position, token in enumerate(tokens[:-1]):
                if link is None:
                    rows.append(self.model.forward(session, [token], [position])[-1])
                else:
                    logits = self._step(schedule, session, link, position, [token], position, {})
                    assert not isinstance(logits, SampledToken)  # no sampling given: the worker sends logits
                    rows.append(logits)
        finally:
            if link is not None:
                link.close()
        return np.stack(rows)

    def _step(
        self,
        schedule: Schedule,
        session: Session,
        link: CloudLink,
        step: int,
        batch: list[int],
        position: int,
        by_kind: dict[str, float],
        sampling: Sampling | None = None,
        sample_index: int = 0,
    ) -> Array | SampledToken:
        """One token step under the plan (the edge's op times are added to `by_kind`): the last
        row's logits, or, when a worker ran the LM head and `sampling` is given, its token."""
        positions = list(range(position, position + len(batch)))
        regs: dict[Reg, Array] = {}

        def run_local(local: LocalStep) -> None:
            for op in local.ops:
                started = time.perf_counter()
                regs[op.dst] = self._edge_op(op, [regs[s] for s in op.srcs], session, batch, positions)
                elapsed = time.perf_counter() - started
                by_kind[op.kind.name] = by_kind.get(op.kind.name, 0.0) + elapsed

        for item in schedule.steps:
            if isinstance(item, LocalStep):
                run_local(item)
            elif isinstance(item, CloudSegment) and item.output is Reg.LOGITS and sampling is not None:
                request = link.segment_request(step, position, item, regs[item.input], sampling, sample_index)
                sampled = link.send(request)()
                if not isinstance(sampled, SampledToken) or not 0 <= sampled.token < self.dims.n_vocab:
                    raise CloudUnavailableError(f"the worker answered token {sampled!r}, outside the vocabulary")
                return sampled
            elif isinstance(item, CloudSegment):
                answer = link.send(link.segment_request(step, position, item, regs[item.input]))()
                assert not isinstance(answer, SampledToken)
                regs[item.output] = answer
            elif isinstance(item, ParallelSection):
                wait = link.send(link.segment_request(step, position, item.remote, regs[item.remote.input]))
                run_local(item.local)
                answer = wait()
                assert not isinstance(answer, SampledToken)  # a parallel section is attention, never the LM head
                regs[item.remote.output] = answer
        logits: Array = regs[Reg.LOGITS][-1]
        return logits

    def _edge_op(
        self, op: EdgeOp, srcs: list[Array], session: Session, batch: list[int], positions: list[int]
    ) -> Array:
        m, kind = self.model, op.kind
        if kind is EdgeOpKind.EMBED:
            return m.embed(batch, positions)
        if kind is EdgeOpKind.LAYER:
            return m.layer_fused(session, op.layer, srcs[0], positions)
        if kind is EdgeOpKind.ATTN_NORM:
            return m.attn_norm(op.layer, srcs[0])
        if kind is EdgeOpKind.ATTN:
            return m.attention(session, op.layer, list(op.heads), srcs[0], positions)
        if kind is EdgeOpKind.FFN_NORM:
            return m.ffn_norm(op.layer, srcs[0])
        if kind is EdgeOpKind.FFN:
            return m.ffn(op.layer, "full", srcs[0])
        if kind is EdgeOpKind.GATE_UP:
            return m.ffn(op.layer, "gate_up", srcs[0])
        if kind is EdgeOpKind.ADD:
            total = srcs[0]
            for other in srcs[1:]:
                total = total + other
            return total
        if kind is EdgeOpKind.LM_HEAD:
            return m.output_logits(np.ascontiguousarray(srcs[0][-1:]))
        raise SplitwiseError(f"unknown edge op {kind}")


__all__ = [
    "CloudLink",
    "CloudUnavailableError",
    "RecoveryEvent",
    "RecoveryPolicy",
    "SegmentRequest",
    "SplitExecutor",
    "SplitResult",
]
