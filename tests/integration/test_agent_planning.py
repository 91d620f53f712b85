"""The agent plans each request itself: real broker, real worker (publishing its profile), real agent.

The final reply must carry the planner, the observation it planned with, the prediction and the
measurement; the plan must be the one the planner gives for that observation and those profiles.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_offload.mqtt import BrokerSettings, MqttConnection
from cloud_offload.worker import CloudWorker
from evaluation.processes import write_toml
from policies.cost import Observation
from policies.plan import Plan
from policies.planners import learned
from policies.planners.context import PlanningContext
from policies.planners.registry import make_planner
from policies.segments import ModelDims
from splitwise_core.profile import Profile
from splitwise_core.tokenizer import bundled_model_path
from splitwise_device.agent import DeviceAgent
from splitwise_device.config import load_device_config
from tests.integration.test_agent import DEVICE, ask
from tests.integration.test_mqtt import subscriptions_settled

pytestmark = pytest.mark.broker
POOL = "planningtest"
PROFILE = Path(__file__).parents[2] / "deploy/profiles/reference-vm.smollm2-135m.profile.json"


def write_config(tmp_path: Path, broker: Any, planning: dict[str, Any], planner: str = "splitwise-dp") -> Path:
    return write_toml(
        tmp_path / "device.toml",
        {
            "device": {"id": DEVICE, "model": bundled_model_path(), "threads": 1, "state_dir": tmp_path / "state"},
            "broker": {"url": broker.url},
            "agent": {"codec": "q8_0", "planner": planner},
            "cloud": {"pool": POOL, "segment_timeout_s": 5},
            "planning": {"probe_interval_s": 0.5, **planning},
        },
    )


@pytest.fixture
def app(mosquitto_broker: Any) -> Iterator[MqttConnection]:
    conn = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port), f"app-{uuid.uuid4().hex[:6]}")
    conn.start()
    yield conn
    conn.stop()


@pytest.fixture
def worker(mosquitto_broker: Any) -> Iterator[CloudWorker]:
    w = CloudWorker(
        bundled_model_path(),
        worker_id="planner-w1",
        pool=POOL,
        broker=BrokerSettings(mosquitto_broker.host, mosquitto_broker.port),
        profile=PROFILE,
    )
    w.start()
    subscriptions_settled(w.connection)  # its segment topics
    yield w
    w.stop()


def start_agent(path: Path) -> DeviceAgent:
    agent = DeviceAgent(load_device_config(path))
    agent.start()
    subscriptions_settled(agent.connection)  # its request topic
    return agent


def replan(reply: dict[str, Any], planner: str, prompt_len: int, max_tokens: int) -> Plan:
    """What the planner gives for the observation the reply reports (both profiles are PROFILE)."""
    obs = reply["plan"]["observation"]
    observation = Observation(
        bandwidth_bps=obs["bandwidth_bps"],
        rtt_s=obs["rtt_ms"] / 1e3,
        prompt_len=prompt_len,
        max_tokens=max_tokens,
        backlog_requests=obs["backlog_requests"],
        backlog_s=obs["backlog_s"],
        arrival_rate=obs["arrival_rate"],
        cloud_load=obs["cloud_load"],
        edge_load=obs["edge_load"],
        edge_op_load=obs["edge_op_load"],
        energy_queue_z=obs["energy_queue_z"],
        work_queue_u=obs["backlog_s"],
    )
    profile = Profile.load(PROFILE)
    dims = ModelDims(n_layer=30, n_head=9, n_head_kv=3, d_model=576, n_ff=1536, n_vocab=49152)
    return make_planner(planner, PlanningContext(profile, profile, dims, "q8_0")).plan(observation)


def test_agent_plans_with_the_published_worker_profile(
    tmp_path: Path, mosquitto_broker: Any, worker: CloudWorker, app: MqttConnection
) -> None:
    agent = start_agent(write_config(tmp_path, mosquitto_broker, {"profile": PROFILE}))
    try:
        assert agent.worker_profiles.wait_for_any(10)
        # A plan that uses the cloud: the reply predicts it, with the link measured by probes/transfers.
        final = ask(app, json.dumps({"prompt": "Hello there", "max_tokens": 6, "plan": "layer-split:10"}))[-1]
        assert final["type"] == "final", final
        plan = final["plan"]
        assert plan["planner"] == "layer-split:10" and plan["name"] == "layer-split:10"
        assert plan["predicted"]["cloud_profile"] == "planner-w1"
        assert plan["observation"]["rtt_ms"] > 0 and plan["observation"]["bandwidth_bps"] > 0
        assert agent.prober.sent >= 1  # the first cloud plan had no estimate yet: a probe was sent
        predicted, measured = plan["predicted"]["latency_s_for_completion"], final["timings"]["total_s"]
        print(f"layer-split:10 predicted {predicted:.3f} s, measured {measured:.3f} s")
        assert predicted > 0 and measured > 0
        assert final["timings"]["cloud_requests"] > 0

        # The configured planner (splitwise-dp) and a per-request planner: each plan is the planner's
        # choice for the observation the reply reports.
        requests: list[dict[str, Any]] = [
            {"prompt": "Hello there", "max_tokens": 6},
            {"prompt": "Hi", "planner": "layer-dp"},
        ]
        for request in requests:
            final = ask(app, json.dumps(request))[-1]
            assert final["type"] == "final", final
            name = request.get("planner", "splitwise-dp")
            assert final["plan"]["planner"] == name
            prompt_len, max_tokens = final["tokens"]["prompt"], request.get("max_tokens", 256)
            expected = replan(final, name, prompt_len, max_tokens)
            assert final["plan"]["edge_heads"] == sum(len(lp.edge_heads) for lp in expected.layers)
            assert final["plan"]["lm_head"] == expected.lm_head.value
            assert final["plan"]["planner_ms"] >= 0 and "predicted" in final["plan"]
    finally:
        agent.drain(timeout=5)
        agent.stop()


def test_an_agent_on_splitwise_rl_opens_its_policy_at_start_and_plans_with_it(
    tmp_path: Path, mosquitto_broker: Any, worker: CloudWorker, app: MqttConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped policy's session is opened before the agent accepts requests (the first request
    would otherwise pay most of a second, and the process would grow at its first learned plan)."""
    monkeypatch.setattr(learned, "_SESSIONS", learned.OrderedDict())
    agent = start_agent(write_config(tmp_path, mosquitto_broker, {"profile": PROFILE}, planner="splitwise-rl"))
    try:
        opened_at_start = [Path(key[0]) for key in learned._SESSIONS]
        shipped = [path.resolve() for path, _ in learned.shipped_policies(agent.controller.dims)]
        assert shipped and opened_at_start == shipped
        assert agent.worker_profiles.wait_for_any(10)
        final = ask(app, json.dumps({"prompt": "Hello there", "max_tokens": 4}))[-1]
        assert final["type"] == "final", final
        assert final["plan"]["planner"] == "splitwise-rl" and final["plan"]["name"] == "splitwise-rl", final["plan"]
        assert len(learned._SESSIONS) == len(shipped)
    finally:
        agent.drain(timeout=5)
        agent.stop()


def test_without_a_cloud_profile_the_agent_stays_on_the_edge_and_says_so(
    tmp_path: Path, mosquitto_broker: Any, app: MqttConnection
) -> None:
    agent = start_agent(write_config(tmp_path, mosquitto_broker, {"profile": PROFILE}))
    try:
        final = ask(app, json.dumps({"prompt": "Hello", "max_tokens": 4}))[-1]
        assert final["type"] == "final", final
        assert final["plan"]["planner"] == "splitwise-dp" and final["plan"]["name"] == "edge-only"
        assert "predicted" not in final["plan"] and final["timings"]["cloud_requests"] == 0
    finally:
        agent.drain(timeout=5)
        agent.stop()


def test_agent_measures_its_own_profile_once_and_caches_it(
    tmp_path: Path, mosquitto_broker: Any, worker: CloudWorker, app: MqttConnection
) -> None:
    path = write_config(tmp_path, mosquitto_broker, {})
    agent = start_agent(path)
    try:
        final = ask(app, json.dumps({"prompt": "Hello", "max_tokens": 4, "plan": "layer-split:20"}))[-1]
        assert final["type"] == "final" and "predicted" in final["plan"], final["plan"]
    finally:
        agent.drain(timeout=5)
        agent.stop()
    cached = list((tmp_path / "state").glob("profile-*-t1.json"))
    assert len(cached) == 1
    profile = Profile.load(cached[0])
    assert profile.threads == 1 and profile.provenance  # says what was measured
    mtime = cached[0].stat().st_mtime_ns
    time.sleep(0.01)
    agent = start_agent(path)
    try:
        assert agent.profiles.edge() == profile
        assert cached[0].stat().st_mtime_ns == mtime  # reused, not measured again
    finally:
        agent.drain(timeout=5)
        agent.stop()
