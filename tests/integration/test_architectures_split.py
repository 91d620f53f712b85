"""Every architecture split over MQTT: a random Qwen2, Qwen3 and GPT-2 file (F32 weights) served by
a real worker behind a real broker, random plans executed by the device's executor, logits compared
with the same file run whole on the device (teacher forced, f32 codec: only summation order differs).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_offload.mqtt import BrokerSettings, MqttConnection, RpcClient
from cloud_offload.protocol import frames, topics
from cloud_offload.worker import CloudWorker
from evaluation import model_factory as mf
from evaluation.corpus import english_text
from policies.plan import FfnMode, Side, random_plan
from policies.segments import ModelDims, compile_plan
from splitwise_core.engine import Engine, log_softmax, model_sha256
from splitwise_device.executor import RecoveryPolicy, SplitExecutor

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]
SHAPES = ["qwen2_gqa4", "qwen3_gqa4", "gpt2_h6"]
PLANS = 3
TOKENS = 40


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSettings]:
    from tests.conftest import MosquittoBroker

    broker = MosquittoBroker(Path(tmp_path_factory.mktemp("broker")))
    broker.start()
    try:
        yield BrokerSettings(broker.host, broker.port)
    finally:
        broker.stop()


@pytest.mark.parametrize("shape", SHAPES)
def test_random_plans_over_mqtt_match_the_whole_model(shape: str, broker: BrokerSettings) -> None:
    path = mf.cached_random_llama(shape, "F32")
    pool = f"arch-{shape.replace('_', '-')}"
    worker = CloudWorker(path, worker_id=f"w-{shape}", pool=pool, broker=broker, profile="off")
    worker.start()
    conn = MqttConnection(broker, f"edge-{uuid.uuid4().hex[:6]}")
    conn.start()
    try:
        engine = Engine(path, threads=1)
        assert engine.config["architecture"] == mf.SHAPES[shape].architecture
        rpc = RpcClient(conn, topics.device_reply_topic("arch", uuid.uuid4().hex[:8]))
        executor = SplitExecutor.over_mqtt(
            engine.model,
            engine.tokenizer.eos_id,
            rpc,
            pool=pool,
            model_hash=frames.model_hash_prefix(model_sha256(engine.path)),
            codec="f32",
            policy=RecoveryPolicy(segment_timeout_s=10),
        )
        tokens = engine.tokenizer.encode(english_text())[:TOKENS]
        local = engine.token_logits(tokens)[:-1]
        p = log_softmax(local)
        dims = ModelDims.from_config(engine.config)
        rng = np.random.default_rng(2026)
        for i in range(PLANS):
            plan = random_plan(rng, dims.n_layer, dims.n_head, i)
            offloaded = [len(lp.edge_heads) < dims.n_head or lp.ffn is not FfnMode.EDGE for lp in plan.layers]
            assert any(offloaded) or plan.lm_head is Side.CLOUD, f"{plan.name} runs everything on the device"
            split = executor.teacher_forced_logits(tokens, compile_plan(plan, dims))
            kl = float((np.exp(p) * (p - log_softmax(split))).sum(-1).mean())
            agree = float((split.argmax(-1) == local.argmax(-1)).mean())
            print(f"{shape} {plan.name}: KL to the whole model {kl:.2e}, top-1 agreement {agree:.3f}")
            assert kl <= 1e-4 and agree >= 0.97, (plan, kl, agree)
    finally:
        conn.stop()
        worker.stop()
