"""`splitwise-device demo`: the whole system on one machine.

Starts mosquitto on a free loopback port (unless --broker is given), one cloud worker process and
the device agent process, asks one prompt over MQTT v5 the way an IoT app would (ResponseTopic +
CorrelationData, streamed), prints the answer, the plan and the timings, and stops everything it
started — also when interrupted.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from cloud_offload.local_broker import LocalBroker
from cloud_offload.mqtt import BrokerSettings, MqttConnection
from cloud_offload.protocol import topics
from splitwise_core.tokenizer import bundled_model_path

DEVICE_ID = "demo-device"
POOL = "demo"


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


def _mosquitto(workdir: Path, stack: ExitStack) -> str:
    broker = LocalBroker(workdir)
    broker.start()
    stack.callback(_say, f"stopped mosquitto (pid {broker.pid})")  # callbacks run last-in, first-out
    stack.callback(broker.stop)
    _say(f"mosquitto listening on {broker.host}:{broker.port} (pid {broker.pid})")
    return broker.url


def _stop(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _say(f"stopped {name} (exit {proc.returncode})")


def _spawn(args: list[str], name: str, log: Path, stack: ExitStack) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    stack.callback(out.close)
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT)
    stack.callback(_stop, proc, name)
    _say(f"started {name} (pid {proc.pid}, log {log})")
    return proc


def run_demo(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else bundled_model_path()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="splitwise-demo-") as tmp:
        workdir = Path(tmp)
        broker = args.broker or _mosquitto(workdir, stack)
        settings = BrokerSettings.from_url(broker)
        worker = _spawn(
            [
                "cloud_offload.cli",
                "serve",
                "--broker",
                broker,
                "--model",
                str(model),
                "--pool",
                POOL,
                "--worker-id",
                "demo-worker",
            ],
            "cloud worker",
            workdir / "worker.log",
            stack,
        )
        config = workdir / "device.toml"
        config.write_text(
            f'[device]\nid = "{DEVICE_ID}"\nmodel = "{model}"\nthreads = 1\nstate_dir = "{workdir}"\n\n'
            f'[broker]\nurl = "{broker}"\n\n[agent]\ncodec = "{args.codec}"\nstatus_interval_s = 5\n\n'
            f'[cloud]\npool = "{POOL}"\nsegment_timeout_s = 10\n'
        )
        agent = _spawn(
            ["splitwise_device", "run", "--config", str(config)], "device agent", workdir / "agent.log", stack
        )

        app = MqttConnection(settings, f"demo-app-{uuid.uuid4().hex[:6]}")
        inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        reply_topic = f"demo/app/{uuid.uuid4().hex[:8]}/reply"
        app.subscribe(reply_topic, inbox.put)
        online: dict[str, bool] = {}
        device_status, worker_status = (
            topics.device_status_topic(DEVICE_ID),
            topics.worker_status_topic("demo-worker"),
        )

        def on_status(msg: mqtt.MQTTMessage) -> None:
            try:
                online[msg.topic] = json.loads(msg.payload).get("state") == "online"
            except ValueError:
                online[msg.topic] = False

        app.subscribe(device_status, on_status)
        app.subscribe(worker_status, on_status)
        app.start(timeout=10)
        stack.callback(app.stop)
        deadline = time.monotonic() + 120
        while not (online.get(device_status) and online.get(worker_status)):
            for proc, name in ((worker, "cloud worker"), (agent, "device agent")):
                if proc.poll() is not None:
                    log = workdir / ("worker.log" if proc is worker else "agent.log")
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                    raise SystemExit(f"{name} exited with {proc.returncode}; the end of its log:\n{tail}")
            if time.monotonic() > deadline:
                raise SystemExit("device or worker did not come online within 120 s")
            time.sleep(0.1)
        _say("device agent and cloud worker are online (retained status)")

        request = {
            "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_tokens,
            "stream": True,
            "plan": args.plan,
        }
        _say(f"asking over MQTT: {json.dumps(request)}")
        correlation = uuid.uuid4().bytes
        app.publish(
            topics.device_infer_topic(DEVICE_ID),
            json.dumps(request),
            response_topic=reply_topic,
            correlation_data=correlation,
        )
        final = _collect(inbox, correlation, timeout=300)
        _report(final)
        return 0 if final.get("type") == "final" else 1


def _collect(inbox: queue.Queue[mqtt.MQTTMessage], correlation: bytes, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    print("answer: ", end="", flush=True)
    while True:
        try:
            msg = inbox.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise SystemExit("no final reply within the timeout") from None
        if getattr(msg.properties, "CorrelationData", None) != correlation:
            continue
        reply: dict[str, Any] = json.loads(msg.payload)
        if reply.get("type") == "chunk":
            print(reply["text"], end="", flush=True)
            continue
        print()
        return reply


def _report(final: dict[str, Any]) -> None:
    if final.get("type") == "error":
        _say(f"error reply: {final['error']}")
        return
    plan, timings, tokens = final["plan"], final["timings"], final["tokens"]
    _say(f"final text: {final['text']!r}")
    _say(
        f"plan {plan.get('name')}: layers edge/cloud/mixed {plan['layers']['edge']}/{plan['layers']['cloud']}/"
        f"{plan['layers']['mixed']}, heads edge/cloud {plan['edge_heads']}/{plan['cloud_heads']}, "
        f"LM head on {plan['lm_head']}; fell back to edge: {plan.get('fell_back_to_edge')}"
    )
    _say(
        f"{tokens['prompt']} prompt + {tokens['completion']} generated tokens; prefill {timings['prefill_s']:.3f} s, "
        f"decode {timings['decode_ms_per_token']:.1f} ms/token, total {timings['total_s']:.2f} s; "
        f"{int(timings['cloud_requests'])} cloud requests, {int(timings['bytes_up'])} B up, "
        f"{int(timings['bytes_down'])} B down; recovery events: {len(final['recovery'])}"
    )
