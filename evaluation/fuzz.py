"""Fuzzing the front door: malformed requests at a device agent, corrupted frames at cloud workers.

Shared by tests/integration/test_fuzz.py (a bounded count, in CI) and bench/fuzz.py (long runs).
`FuzzSystem` starts a real mosquitto, two `splitwise-cloud serve` processes and a
`splitwise-device run` process; `FuzzRun.throw` publishes a list of `Attempt`s as a raw MQTT v5
client and sorts every one by what came back:

* ``clear error``: a well-formed error reply (JSON ``{"error": {"code", "message"}}`` from the
  agent; an ERROR frame from a worker),
* ``answered``: a normal reply (the attempt was valid enough to serve),
* ``documented silence``: no reply, and the attempt had no valid place to reply to (no
  ResponseTopic and no usable ``reply_to``: docs/protocol.md says such requests are dropped),
* ``unexpected reply`` / ``unexpected silence``: a defect.

A watcher subscribed to ``#`` records every topic anybody published to, so a run also shows whether
a process was made to publish outside the project's namespace and the attempts' own reply topics.
Cases are drawn from a seeded generator: the same seed gives the same payloads, so two rounds are
identical (for the memory comparison) apart from the run id in their reply topics, which has a fixed
length.
"""

from __future__ import annotations

import json
import random
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_offload.local_broker import LocalBroker
from cloud_offload.protocol import frames, topics
from evaluation.processes import Proc, write_toml
from splitwise_core import codecs
from splitwise_core.engine import model_sha256
from splitwise_core.ops import OP_SIZE, Op, OpKind
from splitwise_core.tokenizer import bundled_model_path

DEVICE_ID = "fuzz-dev"
POOL = "fuzz"
NAMESPACE = "splitwise/v1/"
CLEAR_ERROR, ANSWERED, DOCUMENTED_SILENCE = "clear error", "answered", "documented silence"
UNEXPECTED_REPLY, UNEXPECTED_SILENCE = "unexpected reply", "unexpected silence"
OUTCOMES = (CLEAR_ERROR, ANSWERED, DOCUMENTED_SILENCE, UNEXPECTED_REPLY, UNEXPECTED_SILENCE)


@dataclass(frozen=True)
class Attempt:
    """One message to throw. `response_topic` is the raw MQTT v5 property, which may be deliberately
    invalid; `reply_topic` is where an answer is due (the property, or a valid ``reply_to`` in the
    payload), None when the attempt has no valid place to be answered."""

    category: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    reply_topic: str | None

    @property
    def answerable(self) -> bool:
        return self.reply_topic is not None


@dataclass
class Report:
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    defects: list[str] = field(default_factory=list)
    foreign_topics: set[str] = field(default_factory=set)

    def by_outcome(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for (_, outcome), n in self.counts.items():
            total[outcome] += n
        return total

    def table(self) -> str:
        categories = sorted({c for c, _ in self.counts})
        width = max([len(c) for c in categories] + [8])
        lines = [f"{'category':<{width}} " + " ".join(f"{o:>19}" for o in OUTCOMES)]
        for category in categories:
            lines.append(f"{category:<{width}} " + " ".join(f"{self.counts[(category, o)]:>19}" for o in OUTCOMES))
        totals = self.by_outcome()
        lines.append(f"{'total':<{width}} " + " ".join(f"{totals[o]:>19}" for o in OUTCOMES))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the device's front door


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def front_door_attempts(seed: int, count: int, reply_prefix: str) -> list[Attempt]:
    """`count` malformed (and a few valid) requests for the agent's infer topic."""
    rng = random.Random(seed)
    out: list[Attempt] = []

    def reply(i: int) -> str:
        return f"{reply_prefix}/{i}"

    def add(category: str, payload: bytes, *, response_topic: str | None = "", reply_to_valid: bool = False) -> None:
        """response_topic "" means: this attempt's own valid reply topic; `reply_to_valid`: the
        payload's reply_to is this attempt's own reply topic."""
        i = len(out)
        topic = reply(i) if response_topic == "" else response_topic
        due = reply(i) if response_topic == "" or reply_to_valid else None
        out.append(Attempt(category, payload, topic, f"c{i}".encode(), due))

    generators: list[Callable[[int], None]] = []

    def not_json(_: int) -> None:
        choice = rng.randrange(5)
        payload = [
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
            b"",
            b'{"prompt": "Hi", "max_tokens": 2',
            b"\xff\xfe\x00{\x00",
            b"prompt=Hi&max_tokens=2",
        ][choice]
        add("not JSON", payload)

    def wrong_types(_: int) -> None:
        payload: Any = rng.choice(
            [
                {"prompt": 1},
                {"prompt": ["Hi"]},
                {"prompt": "Hi", "max_tokens": "many"},
                {"prompt": "Hi", "max_tokens": True},
                {"messages": "Hi"},
                {"messages": [{"role": 1, "content": "Hi"}]},
                {"messages": [{"role": "user"}]},
                {"prompt": "Hi", "temperature": "hot"},
                {"prompt": "Hi", "stream": "yes"},
                {"prompt": "Hi", "seed": [1]},
                {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]},
                {},
                [],
                "Hi",
                42,
                None,
                {"prompt": "Hi", "max_tokens": 2, "unknown_key": 1},
            ]
        )
        add("wrong types", _json(payload))

    def depth_bomb(_: int) -> None:
        depth = rng.choice([64, 1_000, 10_000, 100_000, 1_000_000])
        payload = rng.choice(
            [
                b"[" * depth + b"]" * depth,
                b'{"a":' * depth + b"1" + b"}" * depth,
                b"[" * depth,
                b'{"prompt": "Hi", "max_tokens": 2, "x": ' + b"[" * depth + b"]" * depth + b"}",
            ]
        )
        add("depth bomb", payload)

    def huge_numbers(_: int) -> None:
        payload = rng.choice(
            [
                b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 5000 + b"}",
                b'{"prompt": "Hi", "max_tokens": 1e308}',
                b'{"prompt": "Hi", "max_tokens": -1}',
                b'{"prompt": "Hi", "max_tokens": 0}',
                b'{"prompt": "Hi", "max_tokens": 100000000000000000000}',
                b'{"prompt": "Hi", "max_tokens": 2, "temperature": 1e308}',
                b'{"prompt": "Hi", "max_tokens": 2, "temperature": NaN}',
                b'{"prompt": "Hi", "max_tokens": 2, "temperature": -Infinity}',
                b'{"prompt": "Hi", "max_tokens": 2, "seed": 1180591620717411303424}',
                b'{"prompt": "Hi", "max_tokens": 2.5}',
            ]
        )
        add("huge numbers", payload)

    def unicode_junk(_: int) -> None:
        junk = rng.choice(
            [
                '"\\ud800"',
                '"\\udfff\\ud800"',
                '"a\\u0000b"',
                '"\\uffff\\ufffe"',
                '"\\u202e\\u202d"',
                json.dumps("😀" * 2000),
                '"\\u0001\\u001f\\u007f\\u0085"',
            ]
        )
        payload = rng.choice(
            [
                '{"prompt": %s, "max_tokens": 1}',
                '{"messages": [{"role": "user", "content": %s}], "max_tokens": 1}',
                '{%s: 1, "prompt": "Hi"}',
                '{"prompt": "Hi", "max_tokens": 1, "request_id": %s}',
            ]
        ) % (junk,)
        add("unicode junk", payload.encode("utf-8", "surrogatepass"))

    bad_topics = ["a/#", "+", "x/+/y", "$SYS/fuzz", "x/line\n", "a\x00b", "\x01", "x\x85y", "x\ufffey", ""]

    def bad_reply_to(i: int) -> None:
        bad = rng.choice([*bad_topics, "x" * 70_000, 123, ["a"], None])
        body: dict[str, Any] = {"prompt": rng.choice([1, "Hi"]), "max_tokens": 1, "reply_to": bad}
        with_property = rng.random() < 0.5
        if with_property:  # the ResponseTopic is valid: the answer goes there
            add("bad reply_to", _json(body))
        else:
            add("bad reply_to", _json(body), response_topic=None)

    def bad_response_topic(i: int) -> None:
        # No control characters in the property: mosquitto drops the fuzzer's own connection for
        # them ("Malformed UTF-8"), so they never reach the agent; reply_to carries them instead.
        bad = rng.choice(["a/#", "+", "x/+/y", "$SYS/fuzz", "#"])
        if rng.random() < 0.2:  # long, but a valid topic: answered there
            long_topic = f"{reply(len(out))}/" + "x" * 65_000
            body: dict[str, Any] = {"prompt": 1, "max_tokens": 1}
            out.append(Attempt("long ResponseTopic", _json(body), long_topic, b"l", long_topic))
        elif rng.random() < 0.5:  # a valid reply_to to fall back on
            body = {"prompt": "Hi", "max_tokens": 1, "reply_to": reply(len(out))}
            add("bad ResponseTopic", _json(body), response_topic=bad, reply_to_valid=True)
        else:
            add("bad ResponseTopic", _json({"prompt": "Hi", "max_tokens": 1}), response_topic=bad)

    def odd_correlation(i: int) -> None:
        correlation = rng.choice([b"", b"\x00" * 60_000, bytes(rng.randrange(256) for _ in range(64))])
        body = rng.choice([{"prompt": 1}, {"prompt": "Hi", "max_tokens": 1, "plan": "nonsense"}])
        out.append(Attempt("odd CorrelationData", _json(body), reply(len(out)), correlation, reply(len(out))))

    def oversize(_: int) -> None:
        size = rng.choice([40_000, 300_000, 2_000_000])
        payload = rng.choice(
            [
                _json({"prompt": "a " * (size // 2), "max_tokens": 1}),
                _json({"messages": [{"role": "user", "content": "b" * size}], "max_tokens": 1}),
                b" " * size + b'{"prompt": "Hi"}',
            ]
        )
        add("oversize", payload)

    def unknown_plan(_: int) -> None:
        plan: dict[str, Any] = rng.choice(
            [
                {"plan": "nonsense"},
                {"plan": "layer-split:999"},
                {"plan": "heads:-1"},
                {"plan": {"layers": "x"}},
                {"plan": {"layers": [{"heads": [9] * 99, "ffn": "moon"}]}},
                {"plan": {}},
                {"plan": 5},
                {"planner": "splitwise-RL"},
                {"planner": 5},
                {"planner": "../../etc/passwd"},
            ]
        )
        add("unknown plan", _json({"prompt": "Hi", "max_tokens": 1, **plan}))

    def valid(_: int) -> None:
        add("valid", _json({"prompt": rng.choice(["Hi", "Name a colour."]), "max_tokens": rng.randint(1, 2)}))

    generators = [
        not_json,
        wrong_types,
        depth_bomb,
        huge_numbers,
        unicode_junk,
        bad_reply_to,
        bad_response_topic,
        odd_correlation,
        oversize,
        unknown_plan,
        valid,
    ]
    weights = [10, 12, 6, 8, 8, 12, 10, 4, 3, 8, 2]
    while len(out) < count:
        rng.choices(generators, weights)[0](len(out))
    return out


def classify_agent_reply(payload: bytes) -> str:
    try:
        reply = json.loads(payload)
    except ValueError:
        return UNEXPECTED_REPLY
    if not isinstance(reply, dict):
        return UNEXPECTED_REPLY
    error = reply.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str) and isinstance(error.get("message"), str):
        return CLEAR_ERROR
    if reply.get("type") in ("final", "chunk"):
        return ANSWERED
    return UNEXPECTED_REPLY


# ---------------------------------------------------------------------------------- worker frames

_HEADER = struct.Struct("<4sBBH16sIIHH16sBBH")
_POSITION_AT, _KIND_AT, _VERSION_AT, _CODEC_AT, _NOPS_AT = 28, 5, 4, 52, 54


def reseal(frame: bytes | bytearray) -> bytes:
    """The frame with its CRC recomputed, so a mutation reaches the checks behind the checksum."""
    body = bytes(frame[:-4])
    return body + struct.pack("<I", codecs.crc32c(body))


def frame_attempts(seed: int, count: int, reply_prefix: str, model_hash: bytes, n_layer: int = 30) -> list[Attempt]:
    """`count` corrupted (and a few valid) segment frames for the pool topic."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    out: list[Attempt] = []

    def x(rows: int = 1) -> np.ndarray:
        return np_rng.standard_normal((rows, 576)).astype(np.float32)

    def frame(
        *,
        session: uuid.UUID | None = None,
        position: int = 0,
        ops: list[Op] | None = None,
        rows: int = 1,
        codec: str = "f32",
        mhash: bytes | None = None,
    ) -> bytes:
        return frames.encode_request(
            session=session or uuid.UUID(int=rng.getrandbits(128)),
            step=position,
            position=position,
            segment=0,
            model_hash=model_hash if mhash is None else mhash,
            ops=ops or [Op(OpKind.FFN, rng.randrange(n_layer))],
            tensor=x(rows),
            codec=codec,
        )

    def add(category: str, payload: bytes, answerable: bool = True) -> None:
        i = len(out)
        topic = f"{reply_prefix}/{i}" if answerable else None
        out.append(Attempt(category, payload, topic, f"f{i}".encode(), topic))

    def random_bytes() -> None:
        add("random bytes", bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 55, 68, 200, 4096]))))

    def bit_flips() -> None:
        data = bytearray(frame())
        for _ in range(rng.randint(1, 8)):
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        add("bit flips", bytes(data))

    def truncated() -> None:
        data = frame()
        add("truncated", data[: rng.randrange(len(data))])

    def resealed_header() -> None:
        data = bytearray(frame())
        field_ = rng.randrange(7)
        if field_ == 0:
            struct.pack_into("<I", data, _POSITION_AT, rng.choice([2**31, 2**32 - 1, 8191, 100_000]))
        elif field_ == 1:
            data[_KIND_AT] = rng.choice([0, 7, 255])
        elif field_ == 2:
            data[_VERSION_AT] = rng.choice([0, 2, 255])
        elif field_ == 3:
            data[_CODEC_AT] = rng.choice([0, 9, 255])
        elif field_ == 4:
            struct.pack_into("<H", data, _NOPS_AT, rng.choice([0, 2, 1024, 65535]))
        elif field_ == 5:  # the first dimension (rows) of the shape, after the one op
            dims_at = _HEADER.size + OP_SIZE + 1
            struct.pack_into("<I", data, dims_at, rng.choice([0, 2, 10**6, 2**32 - 1]))
        else:  # the op's layer
            struct.pack_into("<H", data, _HEADER.size + 1, rng.choice([n_layer, 999, 65535]))
        add("resealed header", reseal(data))

    def unknown_session() -> None:
        op = Op(OpKind.ATTN_PART, rng.randrange(n_layer), (0, 1))
        add("unknown session", frame(position=rng.choice([1, 5, 500]), ops=[op]))

    def kv_jump() -> None:
        session = uuid.UUID(int=rng.getrandbits(128))
        op = Op(OpKind.ATTN_PART, 0, (0,))
        add("KV jump", frame(session=session, position=0, ops=[op]))
        add("KV jump", frame(session=session, position=rng.choice([2, 50, 4000]), ops=[op]))

    def rows_past_context() -> None:
        op = Op(OpKind.ATTN_PART, 0, (0,))
        rows = rng.choice([600, 1200])
        add("rows past context", frame(position=rng.choice([0, 7900, 8100]), ops=[op], rows=rows, codec="q8_0"))

    def other_model() -> None:
        add("model mismatch", frame(mhash=bytes(rng.randrange(256) for _ in range(16))))

    def no_reply_topic() -> None:
        add("no ResponseTopic", frame(), answerable=False)

    def valid() -> None:
        add("valid", frame())

    generators = [
        random_bytes,
        bit_flips,
        truncated,
        resealed_header,
        unknown_session,
        kv_jump,
        rows_past_context,
        other_model,
        no_reply_topic,
        valid,
    ]
    weights = [12, 14, 10, 20, 8, 6, 3, 6, 3, 4]
    while len(out) < count:
        rng.choices(generators, weights)[0]()
    return out[:count]


def classify_worker_reply(payload: bytes) -> str:
    try:
        frame = frames.decode_frame(payload)
    except Exception:
        return UNEXPECTED_REPLY
    if frame.kind is frames.FrameKind.ERROR:
        code, message = frame.error()
        return CLEAR_ERROR if code and message else UNEXPECTED_REPLY
    return ANSWERED if frame.kind is frames.FrameKind.RESPONSE else UNEXPECTED_REPLY


# ------------------------------------------------------------------------------------- the thrower


class FuzzRun:
    """A raw paho MQTT v5 client that throws attempts and collects replies, plus a `#` watcher."""

    def __init__(self, broker: LocalBroker, run_id: str) -> None:
        self.run_id = run_id
        self.reply_prefix = f"fuzz/{run_id}"
        self.replies: dict[str, list[bytes]] = {}
        self.topics_seen: set[str] = set()
        self.expected_topics: set[str | None] = set()  # reply topics of every throw of this run
        self._lock = threading.Lock()
        self._clients: list[mqtt.Client] = []
        self.sender = self._client(f"fuzz-sender-{run_id}", [(f"{self.reply_prefix}/#", self._on_reply)], broker)
        self._client(f"fuzz-watcher-{run_id}", [("#", self._on_any)], broker)

    def _client(
        self, client_id: str, subscriptions: list[tuple[str, Callable[[mqtt.MQTTMessage], None]]], broker: LocalBroker
    ) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        for topic, handler in subscriptions:
            client.message_callback_add(topic, _calling(handler))
        client.connect(broker.host, broker.port)
        client.loop_start()
        for topic, _ in subscriptions:
            subscribed.clear()
            client.subscribe(topic, qos=1)
            if not subscribed.wait(10):
                raise RuntimeError(f"no SUBACK for {topic}")
        self._clients.append(client)
        return client

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.replies.setdefault(msg.topic, []).append(bytes(msg.payload))

    def _on_any(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.topics_seen.add(msg.topic)

    def close(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()

    def throw(
        self,
        topic: str,
        attempts: list[Attempt],
        classify: Callable[[bytes], str],
        *,
        settle_s: float,
        progress: Callable[[int], None] | None = None,
    ) -> Report:
        """Publishes every attempt (QoS 1), waits until every answerable one has a reply or
        `settle_s` passed without a new one, and sorts them by outcome."""
        for i, attempt in enumerate(attempts):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if attempt.response_topic is not None:
                props.ResponseTopic = attempt.response_topic
            if attempt.correlation is not None:
                props.CorrelationData = attempt.correlation
            info = self.sender.publish(topic, attempt.payload, qos=1, properties=props)
            info.wait_for_publish(30)
            if progress is not None:
                progress(i + 1)
        own = {a.reply_topic for a in attempts if a.reply_topic is not None}
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() - last_change < settle_s:
            with self._lock:
                count = sum(1 for t in own if t in self.replies)
            if count == len(own):
                break
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            time.sleep(0.1)
        report = Report()
        with self._lock:
            replies = dict(self.replies)
            seen = set(self.topics_seen)
        self.expected_topics |= {a.reply_topic for a in attempts}
        for i, attempt in enumerate(attempts):
            # Replies to an attempt without a due topic would land on its would-be slot.
            got = replies.get(attempt.reply_topic or f"{self.reply_prefix}/{i}", [])
            if got:
                outcomes = {classify(payload) for payload in got}
                if UNEXPECTED_REPLY in outcomes:
                    outcome = UNEXPECTED_REPLY
                else:
                    outcome = ANSWERED if ANSWERED in outcomes else CLEAR_ERROR
            else:
                outcome = UNEXPECTED_SILENCE if attempt.answerable else DOCUMENTED_SILENCE
            report.counts[(attempt.category, outcome)] += 1
            if outcome in (UNEXPECTED_REPLY, UNEXPECTED_SILENCE):
                report.defects.append(f"#{i} {attempt.category}: {outcome}: {attempt.payload[:120]!r}")
        other_runs = ("fuzz/",)  # late answers to an earlier run are that run's business
        report.foreign_topics = {
            t
            for t in seen
            if not t.startswith(NAMESPACE)
            and t not in self.expected_topics
            and not (t.startswith(other_runs) and not t.startswith(f"{self.reply_prefix}/"))
        }
        return report


# ------------------------------------------------------------------------------------ the system


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_bytes(pid: int) -> int:
    """Resident memory, including the pages of the memory-mapped model file."""
    return _status_bytes(pid, "VmRSS")


def private_bytes(pid: int) -> int:
    """Resident anonymous memory (heap, stacks, the engine's buffers): what a leak grows. Unlike RSS it
    leaves out the model file's mapped pages, which fill in as frames for more layers and parts
    arrive (bounded by the file's size, shared with the page cache) and would otherwise read as a
    leak: measured, a worker's RSS stepped 7-14 MiB in round 2 or 3 of 5 identical rounds, all of it
    in the GGUF mapping, its anonymous memory flat."""
    return _status_bytes(pid, "RssAnon")


@dataclass
class FuzzSystem:
    broker: LocalBroker
    agent: Proc
    workers: list[Proc]
    model_hash: bytes

    def alive(self) -> dict[str, bool]:
        return {p.name: p.alive() for p in (self.agent, *self.workers)}

    def rss(self) -> dict[str, int]:
        return {p.name: rss_bytes(p.pid) for p in (self.agent, *self.workers)}

    def private_memory(self) -> dict[str, int]:
        return {p.name: private_bytes(p.pid) for p in (self.agent, *self.workers)}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(40)}" for p in (self.agent, *self.workers))


def _wait_retained(broker: LocalBroker, topic: str, state: str, procs: list[Proc], timeout: float) -> None:
    seen = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"fuzz-wait-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
    )

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if json.loads(msg.payload).get("state") == state:
                seen.set()
        except (ValueError, AttributeError):
            pass

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    try:
        deadline = time.monotonic() + timeout
        while not seen.wait(0.2):
            for proc in procs:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic} not {state!r} within {timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()


@contextmanager
def fuzz_system(workdir: Path, worker_settings: dict[str, Any] | None = None) -> Iterator[FuzzSystem]:
    """mosquitto, two workers and the agent (plan: the first layers on the device, the rest in the
    pool), each a real process; stopped afterwards. `worker_settings` go into the workers'
    ``[worker]`` config section (e.g. ``max_sessions``)."""
    model = bundled_model_path()
    broker = LocalBroker(workdir)
    broker.start()
    procs: list[Proc] = []
    try:
        workers = []
        for worker_id in ("fz1", "fz2"):
            worker_config = write_toml(
                workdir / f"worker-{worker_id}.toml",
                {
                    "worker": {
                        "id": worker_id,
                        "pool": POOL,
                        "model": str(model),
                        "threads": 1,
                        "profile": "off",
                        **(worker_settings or {}),
                    },
                    "broker": {"url": broker.url},
                },
            )
            args = ["cloud_offload.cli", "serve", "--config", str(worker_config)]
            workers.append(Proc(f"worker {worker_id}", args, workdir / f"worker-{worker_id}.log"))
        procs += workers
        config = write_toml(
            workdir / "device.toml",
            {
                "device": {"id": DEVICE_ID, "model": str(model), "threads": 1, "state_dir": str(workdir)},
                "broker": {"url": broker.url},
                "agent": {"planner": "fixed", "plan": "layer-split:28", "queue_size": 8, "drain_timeout_s": 2},
                "cloud": {"pool": POOL, "segment_timeout_s": 5},
            },
        )
        agent = Proc("device agent", ["splitwise_device", "run", "--config", str(config)], workdir / "agent.log")
        procs.append(agent)
        for worker_id, proc in zip(("fz1", "fz2"), workers, strict=True):
            _wait_retained(broker, topics.worker_status_topic(worker_id), "online", [proc], 120)
        _wait_retained(broker, topics.device_status_topic(DEVICE_ID), "online", [agent], 120)
        yield FuzzSystem(broker, agent, workers, frames.model_hash_prefix(model_sha256(model)))
    finally:
        for proc in reversed(procs):
            proc.stop()
        broker.stop()


def fuzz_round(
    system: FuzzSystem,
    name: str,
    *,
    seed: int,
    payloads: int,
    frames: int,
    settle_s: float,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Report, Report]:
    """One round: `payloads` requests at the agent, then `frames` frames at the pool; the two reports."""
    run = FuzzRun(system.broker, name)

    def counter(what: str, total: int) -> Callable[[int], None] | None:
        return None if progress is None else (lambda done: progress(what, done, total))

    try:
        agent = run.throw(
            topics.device_infer_topic(DEVICE_ID),
            front_door_attempts(seed, payloads, f"{run.reply_prefix}/a"),
            classify_agent_reply,
            settle_s=settle_s,
            progress=counter("requests", payloads),
        )
        workers = run.throw(
            topics.pool_segment_topic(POOL),
            frame_attempts(seed, frames, f"{run.reply_prefix}/w", system.model_hash),
            classify_worker_reply,
            settle_s=settle_s,
            progress=counter("frames", frames),
        )
    finally:
        run.close()
    return agent, workers


def ask_normally(broker: LocalBroker, timeout: float = 60.0) -> dict[str, Any]:
    """A normal request, as an app would send it; returns the final reply."""
    run = FuzzRun(broker, uuid.uuid4().hex[:8])
    try:
        topic = f"{run.reply_prefix}/0"
        attempt = Attempt("normal", _json({"prompt": "The capital of France is", "max_tokens": 4}), topic, b"n", topic)
        run.throw(topics.device_infer_topic(DEVICE_ID), [attempt], classify_agent_reply, settle_s=timeout)
        replies = [json.loads(p) for p in run.replies.get(topic, [])]
        finals = [r for r in replies if r.get("type") == "final"]
        if not finals:
            raise AssertionError(f"a normal request got no final reply: {replies}")
        return dict(finals[0])
    finally:
        run.close()


def _calling(handler: Callable[[mqtt.MQTTMessage], None]) -> Callable[[Any, Any, mqtt.MQTTMessage], None]:
    """A paho message callback that hands the message to `handler`."""

    def on_message(_client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        handler(msg)

    return on_message
