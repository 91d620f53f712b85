"""The edge agent: the MQTT front door for IoT apps.

Requests arrive on ``splitwise/v1/device/{id}/infer``; replies go to the MQTT v5 ResponseTopic
with the request's CorrelationData, or to ``reply_to`` for MQTT 3.1.1 clients. Accepted requests
wait in a bounded queue (full → an ``overloaded`` error) and run one at a time through the split
executor. The retained status topic says online/offline (a will message covers crashes).
SIGTERM stops intake, finishes what was accepted (up to ``drain_timeout_s``) and exits; systemd
gets READY (once the model is loaded and the broker connected), STOPPING and watchdog pings when
it supervises the process.

Intake runs in paho's network thread and is cheap and bounded: a reply topic (ResponseTopic or
``reply_to``) must be a valid topic name (``protocol.topic_name_problem``); a payload over
``max_request_bytes`` or nested deeper than ``max_json_depth`` is refused before it is parsed; an
inline plan is checked against the model. Nothing that goes wrong with one request may end the
serving thread: replies that cannot be published are logged and dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from pydantic import ValidationError

from cloud_offload.mqtt import MqttConnection, RpcClient, mqtt_payload, settings_from_config
from cloud_offload.probe import LinkProber
from cloud_offload.profiles import WorkerProfiles
from cloud_offload.protocol import frames, topics
from cloud_offload.protocol.frames import ErrorCode
from cloud_offload.protocol.topics import topic_name_problem
from policies.plan import Plan
from policies.planners.learned import preload_policies
from policies.planners.registry import COST_MODEL_PLANNERS
from policies.segments import ModelDims
from splitwise_core import __version__, systemd
from splitwise_core.engine import Engine, model_sha256
from splitwise_core.errors import SplitwiseError
from splitwise_core.profile import Profile
from splitwise_core.shutdown import StopRequest
from splitwise_device import app_messages
from splitwise_device.app_messages import InferRequest
from splitwise_device.config import FIXED_PLANNER, LEARNED_PLANNER, DeviceConfig
from splitwise_device.controller import (
    Controller,
    Decision,
    InlinePlan,
    NamedPlanner,
    PlanChoice,
    PlanSpec,
    Served,
)
from splitwise_device.executor import RecoveryPolicy, SplitExecutor
from splitwise_device.profile_store import EdgeProfileSource, ProfileStore

log = logging.getLogger(__name__)

PROFILE_WAIT_S = 2.0


@dataclass(frozen=True)
class ReplyPath:
    topic: str
    correlation: bytes | None


@dataclass
class Job:
    request: InferRequest
    reply: ReplyPath
    received_at: float
    plan: Plan | None = None  # the request's inline plan, validated at intake


class IntakeError(ValueError):
    """A request refused at intake before or beside the schema (size, depth, reply topic, plan)."""


class DeviceAgent:
    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        device = config.device
        self.device_id = device.id
        self.engine = Engine(
            device.model,
            threads=device.effective_threads,
            memory_budget_bytes=device.memory_budget,
        )
        cfg = self.engine.config
        self.n_layer, self.n_head = int(cfg["n_layer"]), int(cfg["n_head"])
        model_sha = model_sha256(self.engine.path)
        self.model_hash = frames.model_hash_prefix(model_sha)
        self.status_topic = topics.device_status_topic(self.device_id)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=config.agent.queue_size)
        self.connection = MqttConnection(
            settings_from_config(config.broker),
            config.broker.client_id or f"splitwise-device-{self.device_id}",
            will=(self.status_topic, self._status("offline"), True),
            will_delay_s=5,
        )
        self.rpc = RpcClient(self.connection, topics.device_reply_topic(self.device_id, uuid.uuid4().hex[:12]))
        r = config.recovery
        self.policy = RecoveryPolicy(
            segment_timeout_s=config.cloud.segment_timeout_s,
            base_s=r.base_s,
            factor=r.factor,
            cap_s=r.cap_s,
            jitter=r.jitter,
            max_tries=r.max_tries,
            ban_s=r.ban_s,
            checkpoint_budget_bytes=r.checkpoint_budget_bytes,
        )
        self.banned: dict[str, float] = {}
        self.worker_profiles = WorkerProfiles(self.connection, config.cloud.pool, self.model_hash)
        self.profiles = ProfileStore(
            EdgeProfileSource(
                config.planning.profile, self.engine.path, device.effective_threads, device.state_dir, model_sha.hex()
            ),
            workers=self.worker_profiles,
            configured_cloud=Profile.load(config.planning.cloud_profile) if config.planning.cloud_profile else None,
        )
        self.prober = LinkProber(
            self.rpc,
            topics.pool_segment_topic(config.cloud.pool),
            min_interval_s=config.planning.probe_interval_s,
            timeout_s=min(2.0, config.cloud.segment_timeout_s),
        )
        self.controller = Controller(
            config.planning,
            ModelDims.from_config(cfg),
            codec=config.agent.codec,
            profiles=self.profiles,
            link_up=self.connection.connected.is_set,
            probe=self.prober.probe,
            memory_budget_bytes=device.memory_budget,
        )
        self.executor = SplitExecutor.over_mqtt(
            self.engine.model,
            self.engine.tokenizer.eos_id,
            self.rpc,
            pool=config.cloud.pool,
            model_hash=self.model_hash,
            codec=config.agent.codec,
            policy=self.policy,
            banned=self.banned,
            link_estimator=self.controller.link,
        )
        self.accepting = threading.Event()
        self.busy = threading.Event()
        self.served = 0
        self._worker = threading.Thread(target=self._serve_loop, name="requests", daemon=True)
        self._watchdog: threading.Thread | None = None
        self._ready_lock = threading.Lock()
        self._started = False
        self._ready_sent = False
        self.connection.add_on_connect(self._on_connected)

    def _status(self, state: str) -> bytes:
        return json.dumps(
            {
                "state": state,
                "device_id": self.device_id,
                "version": __version__,
                "model_hash": self.model_hash.hex(),
                "capabilities": {
                    "n_layer": self.n_layer,
                    "n_head": self.n_head,
                    "codecs": ["f32", "f16", "q8_0", "q4_0"],
                    "planner": self.config.agent.planner,
                },
                "queue": self.jobs.qsize(),
            }
        ).encode()

    def _publish_status(self) -> None:
        if not self.connection.connected.is_set():
            return  # paho would queue a stale status per interval; on_connect publishes a fresh one
        try:
            self.connection.publish(self.status_topic, self._status("online"), retain=True)
        except Exception as err:
            log.warning("could not publish the status: %s", err)

    def _on_connected(self) -> None:
        self._publish_status()
        self._notify_ready()

    def _notify_ready(self) -> None:
        """READY=1 once, when start() is done (model loaded) and the broker has connected."""
        with self._ready_lock:
            if self._ready_sent or not self._started or not self.connection.connected.is_set():
                return
            self._ready_sent = True
        systemd.ready(f"serving {topics.device_infer_topic(self.device_id)}")
        log.info("ready: connected to the broker, serving %s", topics.device_infer_topic(self.device_id))

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, connect_timeout: float | None = 30.0) -> None:
        self._worker.start()
        self.connection.subscribe(topics.device_infer_topic(self.device_id), self._on_infer)
        self.connection.start(connect_timeout)
        if self.config.agent.planner in COST_MODEL_PLANNERS:
            # Plan the first request like the later ones: measure (or load) our profile now, and give
            # the workers' retained profiles, delivered right after subscribing, a moment to arrive.
            self.profiles.edge()
            if connect_timeout is not None or self.connection.connected.is_set():
                self.profiles.wait_for_published(PROFILE_WAIT_S)
        if self.config.agent.planner == LEARNED_PLANNER:
            preload_policies(self.controller.dims, self.config.planning.policy)
        self.accepting.set()
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog = threading.Thread(target=self._ping_watchdog, args=(interval / 2,), daemon=True)
            self._watchdog.start()
        with self._ready_lock:
            self._started = True
        if not self.connection.connected.is_set():
            where = f"{self.connection.settings.host}:{self.connection.settings.port}"
            systemd.status(f"waiting for the broker at {where}")
            log.info("device %s waiting for the broker at %s before it reports ready", self.device_id, where)
        self._notify_ready()

    def _ping_watchdog(self, period: float) -> None:
        # Pings come from their own thread, so the watchdog catches a dead or frozen process, not
        # one slow request (requests are bounded by max_tokens and the segment deadlines). They
        # stop if the requests thread has died: systemd then restarts a unit that cannot serve.
        while (self.accepting.is_set() or self.busy.is_set()) and self._worker.is_alive():
            systemd.watchdog_ping()
            time.sleep(period)
        if self.accepting.is_set():
            log.critical("watchdog pings stopped: the requests thread is gone")

    def drain(self, timeout: float | None = None) -> bool:
        """Stops intake, lets accepted requests finish; True if all finished in time."""
        timeout = self.config.agent.drain_timeout_s if timeout is None else timeout
        systemd.stopping()
        self.accepting.clear()
        self.connection.unsubscribe(topics.device_infer_topic(self.device_id))
        deadline = time.monotonic() + timeout
        while (self.busy.is_set() or not self.jobs.empty()) and self._worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        finished = not self.busy.is_set() and self.jobs.empty()
        # Requests still queued will not run: tell their apps (never block on a full queue).
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                message = "device shut down before this request ran"
                self._send(
                    job.reply,
                    app_messages.error_reply(ErrorCode.OVERLOADED, message, request_id=job.request.request_id),
                )
        with contextlib.suppress(queue.Full):  # a request accepted in the meantime; the thread is a daemon
            self.jobs.put_nowait(None)
        self._worker.join(timeout=1)
        return finished

    def stop(self) -> None:
        """Publishes the offline status (if connected: waits up to 2 s) and disconnects; never raises
        over a broker that is down, so a SIGTERM during an outage still exits cleanly."""
        if self.connection.connected.is_set():
            try:
                self.connection.publish(self.status_topic, self._status("offline"), retain=True).wait_for_publish(2)
            except Exception as err:
                log.warning("could not publish the offline status: %s", err)
        self.connection.stop()

    # --- intake (paho's network thread: validate, enqueue, never compute) -------------------------

    def _on_infer(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        correlation = bytes(correlation) if correlation is not None else None
        payload = bytes(msg.payload)
        # A ResponseTopic the broker forwarded may still be no topic we can publish to.
        topic_problem = None if response_topic is None else topic_name_problem(response_topic)
        response = ReplyPath(response_topic, correlation) if response_topic and topic_problem is None else None
        limits = self.config.agent
        try:
            if len(payload) > limits.max_request_bytes:
                raise IntakeError(f"request of {len(payload)} bytes exceeds the limit of {limits.max_request_bytes}")
            if json_nesting_depth(payload, limits.max_json_depth + 1) > limits.max_json_depth:
                raise IntakeError(f"request JSON is nested deeper than {limits.max_json_depth} levels")
        except IntakeError as err:
            # Not parsed, so its reply_to is unknown: only a ResponseTopic can get the error.
            self._refuse(response, response_topic, topic_problem, None, str(err), request_id=None)
            return
        try:
            request = InferRequest.parse(
                payload, max_prompt_bytes=limits.max_prompt_bytes, max_tokens_limit=limits.max_tokens_limit
            )
        except (ValidationError, ValueError) as err:
            self._refuse(response, response_topic, topic_problem, _reply_to_of(payload), _validation_message(err))
            return
        request_id = request.request_id
        if topic_problem is not None:
            message = f"ResponseTopic {str(response_topic)[:200]!r} is not a valid topic name: {topic_problem}"
            self._refuse(None, response_topic, topic_problem, request.reply_to, message, request_id=request_id)
            return
        reply = response or (ReplyPath(request.reply_to, None) if request.reply_to else None)
        if reply is None:
            log.warning("request without ResponseTopic or reply_to dropped (nowhere to answer)")
            return
        plan: Plan | None = None
        if isinstance(request.plan, dict):
            try:
                plan = Plan.from_dict(request.plan).validate_for(self.n_layer, self.n_head)
            except SplitwiseError as err:  # PlanError
                self._send(
                    reply, app_messages.error_reply(ErrorCode.BAD_REQUEST, f"plan: {err}", request_id=request_id)
                )
                return
        if not self.accepting.is_set():
            self._send(
                reply, app_messages.error_reply(ErrorCode.OVERLOADED, "device is shutting down", request_id=request_id)
            )
            return
        self.controller.arrival()
        try:
            self.jobs.put_nowait(Job(request, reply, time.monotonic(), plan))
        except queue.Full:
            self._send(
                reply,
                app_messages.error_reply(
                    ErrorCode.OVERLOADED,
                    f"request queue is full ({self.config.agent.queue_size} waiting); retry later",
                    request_id=request_id,
                ),
            )

    def _refuse(
        self,
        response: ReplyPath | None,
        response_topic: str | None,
        topic_problem: str | None,
        reply_to: str | None,
        message: str,
        request_id: str | None = None,
    ) -> None:
        """A bad_request error to the valid ResponseTopic, else to a valid reply_to; with neither,
        one warning line and the request is dropped."""
        reply = response or (ReplyPath(reply_to, None) if reply_to else None)
        if reply is None:
            if topic_problem is not None:
                log.warning(
                    "request dropped: its ResponseTopic %r is not a valid topic name (%s) and it has no valid "
                    "reply_to: %r",
                    (response_topic or "")[:200],
                    topic_problem,
                    message[:500],
                )
            else:
                log.warning(
                    "request dropped, nowhere valid to answer (no ResponseTopic, no valid reply_to): %r", message[:500]
                )
            return
        self._send(reply, app_messages.error_reply(ErrorCode.BAD_REQUEST, message, request_id=request_id))

    def _publish_reply(self, reply: ReplyPath, message: dict[str, Any]) -> None:
        self.connection.publish(reply.topic, mqtt_payload(message), correlation_data=reply.correlation)

    def _send(self, reply: ReplyPath | None, message: dict[str, Any]) -> bool:
        """Publishes one reply; never raises (a reply that cannot be published is logged and
        dropped). True if it was handed to paho."""
        if reply is None:
            return False
        try:
            self._publish_reply(reply, message)
        except Exception as err:
            log.warning("could not send a %s reply to %r: %s", message.get("type"), reply.topic[:200], err)
            return False
        return True

    # --- serving (one request at a time) ---------------------------------------------------------

    def _serve_loop(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                self.busy.set()
                try:
                    self._serve(job)
                except SplitwiseError as err:
                    self._send(
                        job.reply,
                        app_messages.error_reply(ErrorCode.BAD_REQUEST, str(err), request_id=job.request.request_id),
                    )
                except Exception as err:
                    log.exception("request failed")
                    self._send(
                        job.reply,
                        app_messages.error_reply(ErrorCode.INTERNAL, repr(err), request_id=job.request.request_id),
                    )
                finally:
                    self.served += 1
                    self.busy.clear()
        finally:
            if self.accepting.is_set():
                # Only a BaseException gets here (a bug per request is caught above); the watchdog
                # notices the dead thread and stops pinging, so systemd restarts the unit.
                log.critical("the requests thread stopped; no more requests will be served")

    def plan_choice(self, request: InferRequest, inline: Plan | None = None) -> PlanChoice:
        """The request's own plan (inline or named), its planner, or the configured one.
        `inline`: the request's inline plan, already validated at intake."""
        if isinstance(request.plan, dict):
            return InlinePlan(inline or Plan.from_dict(request.plan).validate_for(self.n_layer, self.n_head))
        if isinstance(request.plan, str):
            return PlanSpec(request.plan)
        if request.planner is not None:
            return NamedPlanner(request.planner)
        if self.config.agent.planner == FIXED_PLANNER:
            assert self.config.agent.plan is not None  # the config requires it
            return PlanSpec(self.config.agent.plan)
        return NamedPlanner(self.config.agent.planner)

    def choose_plan(
        self, request: InferRequest, prompt_len: int, max_tokens: int, inline: Plan | None = None
    ) -> Decision:
        return self.controller.decide(self.plan_choice(request, inline), prompt_len, max_tokens, self.jobs.qsize())

    def _serve(self, job: Job) -> None:
        request = job.request
        tokenizer = self.engine.tokenizer
        messages = [m.model_dump() for m in request.messages] if request.messages else None
        prompt = self.engine.prompt_tokens(request.prompt, messages)
        if len(prompt) > self.config.agent.max_prompt_tokens:
            raise SplitwiseError(
                f"prompt has {len(prompt)} tokens; this device accepts at most {self.config.agent.max_prompt_tokens}"
            )
        context = int(self.engine.config["context_length"])
        max_tokens = min(request.max_tokens or self.config.agent.default_max_tokens, context - len(prompt))
        if max_tokens < 1:
            raise SplitwiseError(f"prompt of {len(prompt)} tokens leaves no room in the context of {context}")
        decision = self.choose_plan(request, len(prompt), max_tokens, job.plan)
        started = time.monotonic()
        emitted: list[int] = []
        sent_text = ""
        chunk_index = 0

        def on_token(token: int) -> None:
            nonlocal sent_text, chunk_index
            emitted.append(token)
            if not request.stream:
                return
            text = tokenizer.decode(emitted)
            # Hold back a trailing partial UTF-8 character until its last byte arrives.
            if text.endswith("\ufffd"):
                return
            if len(text) > len(sent_text):
                self._send(
                    job.reply,
                    app_messages.chunk_reply(chunk_index, text[len(sent_text) :], request_id=request.request_id),
                )
                sent_text, chunk_index = text, chunk_index + 1

        result = self.executor.generate(
            prompt,
            decision.schedule,
            max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            top_k=request.top_k,
            top_p=request.top_p,
            logprobs=request.logprobs,
            on_token=on_token,
        )
        total_s = time.monotonic() - started
        decode_steps = [s.seconds for s in result.steps[1:]]
        timings = {
            "queue_s": started - job.received_at,
            "total_s": total_s,
            "prefill_s": result.steps[0].seconds if result.steps else 0.0,
            "decode_ms_per_token": 1000 * sum(decode_steps) / len(decode_steps) if decode_steps else 0.0,
            "cloud_requests": float(result.transfer.requests),
            "bytes_up": float(result.transfer.bytes_up),
            "bytes_down": float(result.transfer.bytes_down),
        }
        self.controller.completed(decision, Served.from_result(result))
        summary = decision.plan.summary()
        summary["fell_back_to_edge"] = result.fell_back_to_edge
        summary.update(decision.to_json(len(result.steps)))
        # Not _send: a final reply that cannot be published ends the request with an error reply.
        self._publish_reply(
            job.reply,
            app_messages.final_reply(
                text=tokenizer.decode(result.tokens),
                prompt_tokens=len(prompt),
                completion_tokens=len(result.tokens),
                plan=summary,
                timings=timings,
                recovery=[e.to_json() for e in result.events],
                stop_reason=result.stop_reason,
                request_id=request.request_id,
                logprobs=result.sampled,
            ),
        )


def _reply_to_of(payload: bytes) -> str | None:
    """Best effort for invalid requests: their reply_to if it is a valid topic name. The payload has
    passed the size and depth checks, so parsing it is bounded."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    reply_to = value.get("reply_to") if isinstance(value, dict) else None
    return reply_to if isinstance(reply_to, str) and topic_name_problem(reply_to) is None else None


# A JSON string (an unterminated one runs to the end), and every byte that is not a bracket.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_nesting_depth(payload: bytes, stop_at: int | None = None) -> int:
    """The deepest nesting of arrays and objects in a JSON text (the largest count of open minus
    closed brackets over its prefixes), brackets inside strings ignored, without parsing or
    recursion (linear time, vectorised). With `stop_at`, a result below it may be an upper bound
    (the count of opening brackets) instead: enough to compare against a limit of stop_at - 1."""
    if stop_at is not None and payload.count(b"[") + payload.count(b"{") < stop_at:
        return payload.count(b"[") + payload.count(b"{")  # an upper bound below the limit: fine
    brackets = _JSON_STRING.sub(b"", payload).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def _validation_message(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in err.errors(include_url=False)
        )[:2000]
    return str(err)[:2000]


def run_agent(config_path: str) -> int:
    """`splitwise-device run`: serve until SIGTERM/SIGINT, then drain and exit."""
    from splitwise_device.config import load_device_config

    config = load_device_config(config_path)
    logging.basicConfig(level=config.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = DeviceAgent(config)
    stop = StopRequest()
    agent.start(connect_timeout=None)
    while not stop.wait(config.agent.status_interval_s):
        agent._publish_status()
    log.info("draining: %d queued, busy=%s", agent.jobs.qsize(), agent.busy.is_set())
    finished = agent.drain()
    agent.stop()
    log.info("stopped after %d requests%s", agent.served, "" if finished else " (drain timed out)")
    return 0
