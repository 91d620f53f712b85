"""The loopback testbed of the validation tests and the planner benchmark.

One mosquitto broker, cloud worker processes (``python -m cloud_offload.cli serve``) and one
device agent process (``python -m splitwise_device run``), all real. The device's link to the
broker is shaped:

- bandwidth by a token-bucket qdisc on a veth pair into a network namespace that holds the broker
  and the workers (:class:`evaluation.netns.ShapedLink`; needs root), or, where namespaces are
  not available, by the TCP link emulator itself;
- delay (RTT/2 each way), jitter and outages by the TCP link emulator
  (:class:`evaluation.linkproxy.LinkProxy`) between the agent and the broker.

Workers talk to the broker inside the cloud side, unshaped, as in a data centre. `ask()` sends an
infer request the way an IoT app does (MQTT v5 ResponseTopic + CorrelationData) and returns the
final reply, whose ``plan`` part carries the agent's prediction and whose ``timings`` the
measurement. See docs/link-emulation.md.
"""

from __future__ import annotations

import json
import os
import queue
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from cloud_offload.local_broker import LocalBroker
from cloud_offload.mqtt import BrokerSettings, MqttConnection
from cloud_offload.protocol import topics
from evaluation.linkproxy import LinkProxy
from evaluation.netns import ShapedLink
from evaluation.processes import Proc, write_toml
from policies.plan import FfnMode, LayerPlan, Plan, Side, random_plan
from splitwise_core.tokenizer import bundled_model_path

DEVICE_ID = "testbed-dev"
MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
POOL = "testbed"


@dataclass(frozen=True)
class LinkCondition:
    """A link between device and broker: bandwidth (None = unshaped) and the RTT the emulator adds."""

    name: str
    bandwidth_bps: float | None
    rtt_s: float
    jitter_s: float = 0.0

    def describe(self) -> str:
        bw = "unshaped" if self.bandwidth_bps is None else f"{self.bandwidth_bps / 1e6:g} Mbit/s"
        return f"{self.name} ({bw}, +{1e3 * self.rtt_s:g} ms RTT)"


def validation_plan(rng: np.random.Generator, index: int, n_layer: int = 30, n_head: int = 9) -> Plan:
    """Plan `index` of the cost-model validation; its style is index mod 3 (bench/validate_cost_model.py)."""
    style = index % 3
    if style == 0:
        return random_plan(rng, n_layer, n_head, index)
    mixed = 0.2 if style == 1 else 0.0
    side = Side(str(rng.choice(["edge", "cloud"])))
    layers = []
    for _ in range(n_layer):
        if rng.random() < 0.15:
            side = Side.CLOUD if side is Side.EDGE else Side.EDGE
        if rng.random() < mixed:
            edge = tuple(sorted(int(h) for h in rng.choice(n_head, size=rng.integers(1, n_head), replace=False)))
            layers.append(LayerPlan(edge_heads=edge, ffn=FfnMode(str(rng.choice(["edge", "cloud", "split"])))))
        else:
            heads = tuple(range(n_head)) if side is Side.EDGE else ()
            layers.append(LayerPlan(edge_heads=heads, ffn=FfnMode(side.value)))
    lm_head = Side(str(rng.choice(["edge", "cloud"])))
    return Plan(n_layer=n_layer, n_head=n_head, layers=tuple(layers), lm_head=lm_head, name=f"validation-{index}")


class CpuLimit:
    """A cgroup-v1 CFS quota for one process tree: `share` of one core, enforced every `period_s`.

    Makes the device slower than the cloud worker on a machine where both are the same CPU (the
    short period keeps the stalls short against per-token work of ~10 ms).
    """

    ROOT = Path("/sys/fs/cgroup/cpu")

    def __init__(self, share: float, period_s: float = 0.01) -> None:
        if not 0 < share <= 64:
            raise ValueError(f"cpu share {share}: expected 0 < share <= 64")
        self.path = self.ROOT / f"splitwise-edge-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path.mkdir()
        period_us = int(period_s * 1e6)
        (self.path / "cpu.cfs_period_us").write_text(str(period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(share * period_us))))
        self.share = share

    @classmethod
    def available(cls) -> str | None:
        if not (cls.ROOT / "cpu.cfs_quota_us").exists():
            return "no cgroup v1 cpu controller at /sys/fs/cgroup/cpu"
        if not os.access(cls.ROOT, os.W_OK):
            return "cannot create cgroups (not root)"
        return None

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            (self.ROOT / "cgroup.procs").write_text(pid)  # back to the root group before removal
        self.path.rmdir()


class Testbed:
    """Broker, workers and agent; `set_link()` changes the link between requests."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        workdir: Path,
        *,
        kernel_shaping: bool = True,
        workers: int = 1,
        worker_profile: str = "measure",
        agent: dict[str, dict[str, Any]] | None = None,
        edge_cpu_share: float | None = None,
    ) -> None:
        """`edge_cpu_share` limits the agent process to that share of one core (see CpuLimit)."""
        self.workdir = workdir
        self.cpu_limit: CpuLimit | None = None
        if edge_cpu_share is not None:
            reason = CpuLimit.available()
            if reason is not None:
                raise RuntimeError(f"edge_cpu_share needs cgroups: {reason}")
            self.cpu_limit = CpuLimit(edge_cpu_share)
        self.shaped: ShapedLink | None = None
        reason = ShapedLink.available() if kernel_shaping else "not asked for"
        if reason is None:
            self.shaped = ShapedLink(None)
            self.shaped.__enter__()
        self.kernel_shaping = self.shaped is not None
        self.why_not_kernel = reason
        self.procs: list[Proc] = []
        try:
            if self.shaped is not None:
                self.broker = LocalBroker(workdir, host=self.shaped.cloud_ip, command_prefix=self.shaped.prefix)
            else:
                self.broker = LocalBroker(workdir)
            self.broker.start()
            self.proxy = LinkProxy(self.broker.host, self.broker.port).start()
            self.app = MqttConnection(BrokerSettings(self.broker.host, self.broker.port), f"app-{uuid.uuid4().hex[:8]}")
            self.app_topic = f"testbed/app/{uuid.uuid4().hex[:8]}"
            self._replies: dict[bytes, queue.Queue[dict[str, Any]]] = {}
            self._status: dict[str, str] = {}
            self.worker_profiles: dict[str, bytes] = {}
            """The profiles the workers published, by topic (what the agent plans with)."""
            self.app.subscribe(self.app_topic, self._on_reply)
            self.app.subscribe(topics.device_status_topic(DEVICE_ID), self._on_status)
            self.app.subscribe(f"{topics.TOPIC_ROOT}/cloud/worker/+/status", self._on_status)
            self.app.subscribe(topics.pool_profile_filter(POOL), self._on_profile)
            self.app.start()
            self.worker_ids = [f"w{i}" for i in range(workers)]
            for worker_id in self.worker_ids:
                self._start_worker(worker_id, worker_profile)
            for worker_id in self.worker_ids:
                self._wait_status(topics.worker_status_topic(worker_id), "online", 60)
                if worker_profile != "off":  # the agent should plan with it from the first request
                    self._wait_status(topics.worker_profile_topic(POOL, worker_id), "published", 120)
            self._start_agent(agent or {})
        except BaseException:
            self.close()
            raise

    # --- processes ------------------------------------------------------------------------------

    def _prefix(self) -> list[str]:
        return list(self.shaped.prefix) if self.shaped is not None else []

    def _start_worker(self, worker_id: str, profile: str) -> None:
        args = [
            "cloud_offload.cli",
            "serve",
            "--broker",
            f"mqtt://{self.broker.host}:{self.broker.port}",
            "--model",
            str(bundled_model_path()),
            "--worker-id",
            worker_id,
            "--pool",
            POOL,
            "--threads",
            "1",
            "--profile",
            profile,
        ]
        log = self.workdir / f"worker-{worker_id}.log"
        self.procs.append(Proc(f"worker {worker_id}", args, log, prefix=self._prefix()))

    def _start_agent(self, overrides: dict[str, dict[str, Any]]) -> None:
        sections: dict[str, dict[str, Any]] = {
            "device": {
                "id": DEVICE_ID,
                "model": str(bundled_model_path()),
                "threads": 1,
                "state_dir": str(self.workdir / "agent-state"),
            },
            "broker": {"url": self.proxy.url},
            "agent": {"codec": "q8_0", "queue_size": 64, "max_tokens_limit": 512},
            "cloud": {"pool": POOL, "segment_timeout_s": 10.0},
            "planning": {"probe_interval_s": 2.0, "link_half_life_s": 5.0},
        }
        for name, values in overrides.items():
            sections.setdefault(name, {}).update(values)
        config = write_toml(self.workdir / "device.toml", sections)
        self.agent = Proc("agent", ["splitwise_device", "run", "--config", str(config)], self.workdir / "agent.log")
        self.procs.append(self.agent)
        if self.cpu_limit is not None:
            self.cpu_limit.add(self.agent.popen.pid)  # before it profiles itself: the profile sees the limit
        self._wait_status(topics.device_status_topic(DEVICE_ID), "online", 120)

    def edge_profile(self) -> Path:
        """The profile the agent measured at start and plans with (cached in its state directory)."""
        found = sorted((self.workdir / "agent-state").glob("profile-*.json"))
        if len(found) != 1:
            raise RuntimeError(f"expected one profile in the agent's state directory, found {[f.name for f in found]}")
        return found[0]

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            self._status[msg.topic] = json.loads(msg.payload)["state"]
        except (ValueError, KeyError, TypeError):
            self._status[msg.topic] = "?"

    def _on_profile(self, msg: mqtt.MQTTMessage) -> None:
        self._status[msg.topic] = "published" if msg.payload else "withdrawn"
        if msg.payload:
            self.worker_profiles[msg.topic] = bytes(msg.payload)

    def _wait_status(self, topic: str, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._status.get(topic) != state:
            for p in self.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic} not {state!r} within {timeout:g}s\n{self.logs()}")
            time.sleep(0.05)

    # --- link -----------------------------------------------------------------------------------

    def set_link(self, link: LinkCondition) -> None:
        """Kernel tbf for bandwidth when available (else the emulator), the emulator for delay."""
        if self.shaped is not None:
            self.shaped.set_rate(link.bandwidth_bps)
            self.proxy.set_link(bandwidth_bps=None, delay_s=link.rtt_s / 2, jitter_s=link.jitter_s)
        else:
            self.proxy.set_link(bandwidth_bps=link.bandwidth_bps, delay_s=link.rtt_s / 2, jitter_s=link.jitter_s)

    # --- requests -------------------------------------------------------------------------------

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None)
        box = self._replies.get(bytes(correlation)) if correlation is not None else None
        if box is not None:
            box.put(json.loads(msg.payload))

    def send(self, request: dict[str, Any]) -> queue.Queue[dict[str, Any]]:
        """Publishes a request; the returned queue receives its replies (chunks, then final/error)."""
        correlation = uuid.uuid4().bytes
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        self._replies[correlation] = box
        self.app.publish(
            topics.device_infer_topic(DEVICE_ID),
            json.dumps(request).encode(),
            response_topic=self.app_topic,
            correlation_data=correlation,
        ).wait_for_publish(10)
        return box

    def wait_final(self, box: queue.Queue[dict[str, Any]], timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no final reply within {timeout:g}s\n{self.logs()}")
            try:
                reply = box.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not self.agent.alive():
                    raise RuntimeError(f"the agent died:\n{self.agent.tail()}") from None
                continue
            if reply.get("type") in ("final", "error"):
                return reply

    def ask(self, request: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        return self.wait_final(self.send(request), timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(20)}" for p in self.procs)

    def close(self) -> None:
        for p in sorted(self.procs, key=lambda p: p is not getattr(self, "agent", None)):
            p.stop()
        if hasattr(self, "app"):
            self.app.stop()
        if hasattr(self, "proxy"):
            self.proxy.stop()
        if hasattr(self, "broker"):
            self.broker.stop()
        if self.shaped is not None:
            self.shaped.__exit__(None, None, None)
            self.shaped = None
        if self.cpu_limit is not None:
            self.cpu_limit.close()
            self.cpu_limit = None

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
