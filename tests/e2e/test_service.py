"""The services as an operator and a user meet them: systemd notifications and a draining
SIGTERM, the split path from the command line, and the demo command."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cloud_offload.protocol import topics
from tests.e2e.conftest import DEVICE_ID, POOL, System
from tests.e2e.test_faults import PROMPT, check_final, infer

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_sigterm_drains_the_request_in_flight_and_notifies_systemd(
    system: System, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    system.start_worker("w1")
    agent = system.start_agent(agent={"drain_timeout_s": 60})
    asked = system.app.ask(infer(max_tokens=24))
    asked.wait_chunks(2, timeout=60)
    agent.popen.terminate()  # SIGTERM while the request is half done
    check_final(asked.wait(60), reference(PROMPT, 24))
    assert agent.popen.wait(timeout=30) == 0
    system.app.wait_status(topics.device_status_topic(DEVICE_ID), "offline", 10, [])
    # The agent has exited: everything it sent is queued on the socket already, no need to wait.
    notify.setblocking(False)
    messages = []
    while True:
        try:
            messages.append(notify.recv(4096).decode())
        except BlockingIOError:
            break
    notify.close()
    assert any("READY=1" in m for m in messages), messages
    assert any("STOPPING=1" in m for m in messages), messages


def test_generate_command_runs_a_split_plan(system: System, reference: Any) -> None:
    system.start_worker("w1")
    exe = shutil.which("splitwise-device")
    assert exe is not None
    result = subprocess.run(
        [
            exe,
            "generate",
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "8",
            "--plan",
            "layer-split:15",
            "--broker",
            system.broker.url,
            "--codec",
            "f32",
            "--pool",
            POOL,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    from splitwise_core.engine import Engine
    from splitwise_core.tokenizer import bundled_model_path

    local = Engine(bundled_model_path()).generate("The capital of France is", max_tokens=8)
    assert reply["tokens"] == local.tokens
    assert reply["plan"]["name"] == "layer-split:15" and reply["transfer"]["requests"] == 8


def test_generate_command_without_a_broker_is_a_clear_error() -> None:
    exe = shutil.which("splitwise-device")
    assert exe is not None
    result = subprocess.run(
        [exe, "generate", "--prompt", "x", "--plan", "cloud-only"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--broker" in result.stderr


def test_demo_command_answers_and_cleans_up() -> None:
    exe = shutil.which("splitwise-device")
    assert exe is not None
    before = subprocess.run(["pgrep", "-c", "mosquitto"], capture_output=True, text=True).stdout.strip() or "0"
    result = subprocess.run(
        [exe, "demo", "--max-tokens", "12"], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final text:" in result.stdout and "12 generated tokens" in result.stdout
    assert "stopped device agent (exit 0)" in result.stdout and "stopped cloud worker (exit 0)" in result.stdout
    after = subprocess.run(["pgrep", "-c", "mosquitto"], capture_output=True, text=True).stdout.strip() or "0"
    assert after == before  # the demo's broker is gone; nobody else's was touched
