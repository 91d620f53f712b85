"""Split execution through a real broker: an in-process cloud worker, the edge executor, real
frames. Process-level fault tests live in tests/e2e."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cloud_offload.local_broker import LocalBroker
from cloud_offload.mqtt import BrokerSettings, MqttConnection, RpcClient
from cloud_offload.protocol import frames, topics
from cloud_offload.worker import CloudWorker
from policies.plan import parse_plan
from policies.segments import ModelDims, Schedule, compile_plan
from splitwise_core.engine import Engine, model_sha256
from splitwise_core.errors import SplitwiseError
from splitwise_core.sampling import SampledToken
from splitwise_core.shards import shard_model
from splitwise_core.tokenizer import bundled_model_path
from splitwise_device.executor import RecoveryPolicy, SplitExecutor

pytestmark = pytest.mark.broker
PROMPT = "The three most useful things to know about MQTT are"


def schedule_for(engine: Engine, plan_name: str) -> Schedule:
    cfg = engine.config
    return compile_plan(parse_plan(plan_name, cfg["n_layer"], cfg["n_head"]), ModelDims.from_config(cfg))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(bundled_model_path(), threads=1)


@contextmanager
def running_worker(broker: LocalBroker, **limits: int) -> Iterator[CloudWorker]:
    """A worker of pool "test" on `broker`, with `limits` (e.g. max_rows_per_frame) as given."""
    w = CloudWorker(
        bundled_model_path(),
        worker_id=f"w{uuid.uuid4().hex[:6]}",
        pool="test",
        broker=BrokerSettings(broker.host, broker.port),
        **limits,
    )
    w.start()
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def worker(mosquitto_broker: LocalBroker) -> Iterator[CloudWorker]:
    with running_worker(mosquitto_broker) as w:
        yield w


@pytest.fixture
def executor(mosquitto_broker, engine: Engine) -> Iterator[tuple[SplitExecutor, RpcClient]]:  # type: ignore[no-untyped-def]
    conn = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port), f"edge-{uuid.uuid4().hex[:6]}")
    conn.start()
    rpc = RpcClient(conn, topics.device_reply_topic("dev1", uuid.uuid4().hex[:8]))
    model_hash = frames.model_hash_prefix(model_sha256(engine.path))
    policy = RecoveryPolicy(segment_timeout_s=5.0)
    executor = SplitExecutor.over_mqtt(
        engine.model, engine.tokenizer.eos_id, rpc, pool="test", model_hash=model_hash, codec="f32", policy=policy
    )
    yield executor, rpc
    conn.stop()


@pytest.mark.parametrize("plan_name", ["cloud-only", "layer-split:15", "heads:4"])
def test_split_plan_gives_the_local_greedy_text(engine, worker, executor, plan_name) -> None:  # type: ignore[no-untyped-def]
    split_executor, _rpc = executor
    prompt = engine.tokenizer.encode(PROMPT)
    local = engine.generate(PROMPT, max_tokens=12)
    schedule = schedule_for(engine, plan_name)
    result = split_executor.generate(prompt, schedule, 12)
    assert result.plan is schedule.plan
    assert result.events == [] and not result.fell_back_to_edge
    assert result.transfer.requests > 0
    assert result.tokens == local.tokens, (engine.tokenizer.decode(result.tokens), local.text)


@pytest.mark.parametrize("plan_name", ["cloud-only", "layer-split:15"])
def test_a_worker_running_the_lm_head_samples_as_the_device_would(engine, worker, executor, plan_name) -> None:  # type: ignore[no-untyped-def]
    split_executor, _rpc = executor
    prompt = engine.tokenizer.encode(PROMPT)
    args = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 12345, "logprobs": 2}
    local = split_executor.generate(prompt, schedule_for(engine, "edge-only"), 16, **args)
    assert local.transfer.requests == 0
    split = split_executor.generate(prompt, schedule_for(engine, plan_name), 16, **args)
    assert split.events == [] and not split.fell_back_to_edge
    assert split.tokens == local.tokens, (engine.tokenizer.decode(split.tokens), engine.tokenizer.decode(local.tokens))
    assert [s.token for s in split.sampled][: len(split.tokens)] == split.tokens
    for ours, theirs in zip(split.sampled, local.sampled, strict=True):
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-3)
    # Every step's answer is the token (a few hundred bytes with the echoed ops), not 49152 f32
    # logits (196,608 bytes); the cost model counts exactly what travels.
    (answer,) = schedule_for(engine, plan_name).segment_bytes("f32", 1)
    assert answer.down < 500
    with_logprobs = answer.down + SampledToken.wire_bytes(2) - SampledToken.wire_bytes(0)
    assert split.transfer.bytes_down == len(split.steps) * with_logprobs


def test_transfers_feed_the_link_estimator(engine, worker, mosquitto_broker) -> None:  # type: ignore[no-untyped-def]
    from splitwise_device.estimators import LinkEstimator

    conn = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port), "edge-estimate")
    conn.start()
    try:
        rpc = RpcClient(conn, topics.device_reply_topic("dev2", uuid.uuid4().hex[:8]))
        estimator = LinkEstimator()
        model_hash = frames.model_hash_prefix(model_sha256(engine.path))
        executor = SplitExecutor.over_mqtt(
            engine.model,
            engine.tokenizer.eos_id,
            rpc,
            pool="test",
            model_hash=model_hash,
            codec="q8_0",
            policy=RecoveryPolicy(),
            link_estimator=estimator,
        )
        executor.generate(engine.tokenizer.encode(PROMPT), schedule_for(engine, "heads:4"), 4)
        # Loopback: a segment's network share is well under 50 ms once the worker's compute is removed.
        assert estimator.rtt_s is not None and 0 < estimator.rtt_s < 0.05
    finally:
        conn.stop()


@pytest.fixture
def small_frame_worker(mosquitto_broker: LocalBroker) -> Iterator[CloudWorker]:
    with running_worker(mosquitto_broker, max_rows_per_frame=16) as w:
        yield w


def test_a_prompt_longer_than_a_frame_is_sent_in_chunks(engine, small_frame_worker, executor) -> None:  # type: ignore[no-untyped-def]
    """Workers refuse frames with more rows than their max_rows_per_frame; a longer prefill goes as
    chunks, and the text is still the local greedy text (no refusal, no edge fallback)."""
    split_executor, _rpc = executor
    chunked = SplitExecutor(
        split_executor.model, split_executor.eos_id, split_executor.link_factory, max_rows_per_frame=16
    )
    text = " ".join([PROMPT] * 4)
    prompt = engine.tokenizer.encode(text)
    assert len(prompt) > 2 * 16
    schedule = schedule_for(engine, "layer-split:15")
    local = engine.generate(text, max_tokens=6)
    result = chunked.generate(prompt, schedule, 6)
    assert result.events == [] and not result.fell_back_to_edge, [e.to_json() for e in result.events]
    assert result.tokens == local.tokens
    chunks = -(-len(prompt) // 16)
    assert result.transfer.requests == chunks + len(result.tokens) - (result.stop_reason == "max_tokens")
    assert small_frame_worker.stats.errors == 0

    # The same request unchunked is refused by this worker (too many rows) and falls back to the edge.
    unchunked = split_executor.generate(prompt, schedule, 2)
    assert unchunked.fell_back_to_edge
    assert "too_many_rows" in " ".join(e.detail for e in unchunked.events)


def test_max_rows_per_frame_must_be_positive(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SplitwiseError, match="max_rows_per_frame must be a positive integer"):
        SplitExecutor(engine.model, engine.tokenizer.eos_id, None, max_rows_per_frame=0)


def test_a_schedule_for_another_model_is_refused(engine) -> None:  # type: ignore[no-untyped-def]
    """The caller compiles the plan; the executor checks the schedule is for its model's dims."""
    executor = SplitExecutor(engine.model, engine.tokenizer.eos_id, None)
    dims = ModelDims.from_config(engine.config)
    other = ModelDims(dims.n_layer + 1, dims.n_head, dims.n_head_kv, dims.d_model, dims.n_ff, dims.n_vocab)
    schedule = compile_plan(parse_plan("edge-only", other.n_layer, other.n_head), other)
    with pytest.raises(SplitwiseError, match="the schedule was compiled for a model with"):
        executor.generate(engine.tokenizer.encode(PROMPT), schedule, 2)
    with pytest.raises(SplitwiseError, match="the schedule was compiled for a model with"):
        executor.teacher_forced_logits(engine.tokenizer.encode(PROMPT), schedule)


@pytest.mark.parametrize(
    ("properties", "seconds"),
    [
        ({"compute_us": "1500", "queue_us": "500"}, 0.002),
        ({"compute_us": "1500"}, 0.0015),
        ({"queue_us": "500"}, None),
        ({}, None),
        ({"compute_us": "1.5", "queue_us": "0"}, None),
        ({"compute_us": "12", "queue_us": "x"}, None),
        ({"compute_us": "-20", "queue_us": "5"}, None),
    ],
)
def test_worker_time_is_parsed_once_into_seconds(properties: dict[str, str], seconds: float | None) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from cloud_offload.probe import worker_time_s

    msg = mqtt.MQTTMessage()
    msg.properties = Properties(PacketTypes.PUBLISH)
    if properties:
        msg.properties.UserProperty = list(properties.items())
    assert worker_time_s(msg) == seconds


def test_a_device_under_a_memory_budget_keeps_the_plans_layers_loaded(
    engine: Engine, worker: CloudWorker, mosquitto_broker: LocalBroker, tmp_path: Path
) -> None:
    """Shards under a budget of the base file and 4 layer files, plan layer-split:3: the three
    edge layers are loaded before the first token and never again however many tokens run; a
    plan change loads its own layers and unloads the others; the text is the unbudgeted one."""
    shards = tmp_path / "shards"
    shard_model(bundled_model_path(), shards)
    budget = (shards / "base.gguf").stat().st_size + 4 * (shards / "layer-000.gguf").stat().st_size
    device = Engine(shards, threads=1, memory_budget_bytes=budget)
    conn = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port), f"edge-{uuid.uuid4().hex[:6]}")
    conn.start()
    try:
        rpc = RpcClient(conn, topics.device_reply_topic("dev1", uuid.uuid4().hex[:8]))
        split = SplitExecutor.over_mqtt(
            device.model,
            device.tokenizer.eos_id,
            rpc,
            pool="test",
            model_hash=frames.model_hash_prefix(model_sha256(engine.path)),
            codec="f32",
            policy=RecoveryPolicy(segment_timeout_s=5.0),
        )
        prompt = engine.tokenizer.encode(PROMPT)
        want = engine.generate(PROMPT, max_tokens=10).tokens
        for _request in range(2):
            result = split.generate(prompt, schedule_for(engine, "layer-split:3"), max_tokens=10)
            assert result.tokens == want[: len(result.tokens)] and len(result.tokens) == len(want)
            stats = device.model.weight_stats()
            assert (stats["loads"], stats["mapped_files"]) == (3, 4), stats  # layers 0-2 + base, once
        assert split.retained_layers == (0, 1, 2)

        result = split.generate(prompt, schedule_for(engine, "layer-split:2"), max_tokens=4)
        stats = device.model.weight_stats()
        assert (stats["loads"], stats["evictions"], stats["mapped_files"]) == (3, 1, 3), stats
        assert split.retained_layers == (0, 1)
    finally:
        conn.stop()
