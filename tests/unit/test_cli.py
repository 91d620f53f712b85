"""The installed console scripts work as a user would call them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from evaluation.processes import write_toml
from policies.planners.registry import PLANNER_NAMES
from splitwise_core.errors import SplitwiseError
from splitwise_core.tokenizer import bundled_model_path
from splitwise_device.agent import DeviceAgent
from splitwise_device.app_messages import InferRequest
from splitwise_device.config import load_device_config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(args[0])
    assert exe is not None, f"{args[0]} is not installed as a console script"
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=60)


def test_help_lists_commands() -> None:
    result = run("splitwise-device", "--help")
    assert result.returncode == 0
    assert "codec-demo" in result.stdout


def test_codec_demo_round_trips_every_codec() -> None:
    result = run("splitwise-device", "codec-demo", "--size", "100")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert set(lines) == {"f32", "f16", "q8_0", "q4_0"}
    assert lines["f32"][1] == "400" and lines["q8_0"][1] == "136" and lines["q4_0"][1] == "72"
    assert float(lines["f32"][3]) == 0.0 and 0 < float(lines["q8_0"][3]) < float(lines["q4_0"][3])


@pytest.mark.parametrize("bad", [["codec-demo", "--size", "0"], ["codec-demo", "--size", "x"], ["nope"]])
def test_bad_arguments_exit_2_with_a_message(bad: list[str]) -> None:
    result = run("splitwise-device", *bad)
    assert result.returncode == 2
    assert "error" in result.stderr


def test_cloud_cli_has_help_and_version() -> None:
    assert run("splitwise-cloud", "--help").returncode == 0
    assert "0.1.0" in run("splitwise-cloud", "--version").stdout


def test_generate_json_gives_tokens_text_and_timings() -> None:
    import json

    result = run("splitwise-device", "generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert len(reply["tokens"]) == 8 and reply["stop_reason"] == "max_tokens"
    assert isinstance(reply["text"], str) and reply["text"]
    assert reply["timings"]["decode_tokens_per_s"] > 0


def test_perplexity_on_a_text_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    result = run("splitwise-device", "perplexity", "--text", str(text), "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["tokens"] > 50 and 1.0 < reply["perplexity"] < 20.0  # repeated text is predictable


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--prompt", "x", "--model", "/nonexistent.gguf"], "nonexistent.gguf"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["perplexity", "--text", "/nonexistent.txt"], "nonexistent.txt"),
    ],
)
def test_engine_commands_report_bad_input(args: list[str], message: str) -> None:
    result = run("splitwise-device", *args)
    assert result.returncode in (1, 2)
    assert message in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ check-config and run agree on the planner

PROFILE = Path(__file__).parents[2] / "deploy/profiles/reference-vm.smollm2-135m.profile.json"
# Every planner name a device.toml may give: the registry's, "fixed", and near-miss spellings.
PLANNER_CANDIDATES = sorted({*PLANNER_NAMES, "fixed", "splitwise_rl", "splitwise_dp"})


def agent_refusal(path: Path) -> str | None:
    """None if the agent `splitwise-device run` starts from ``path`` plans its first request with the
    configured planner; else why not. Everything `run` does short of connecting to the broker."""
    try:
        agent = DeviceAgent(load_device_config(path))
        decision = agent.choose_plan(InferRequest(prompt="Hello"), prompt_len=4, max_tokens=4)
    except SplitwiseError as err:
        return str(err)
    assert decision.prediction is not None  # both profiles are configured: the planner really ran
    if "fallback:" in decision.plan.name:  # splitwise-rl without a usable policy: splitwise-dp planned
        return decision.plan.name
    return None


@pytest.mark.parametrize("planner", PLANNER_CANDIDATES)
def test_check_config_accepts_a_planner_iff_the_agent_runs_it(tmp_path: Path, planner: str) -> None:
    agent = {"planner": planner, **({"plan": "layer-split:15"} if planner == "fixed" else {})}
    path = write_toml(
        tmp_path / "device.toml",
        {
            "device": {"id": "dev1", "model": bundled_model_path(), "threads": 1, "state_dir": tmp_path / "state"},
            "agent": agent,
            "planning": {"profile": PROFILE, "cloud_profile": PROFILE},
        },
    )
    checked = run("splitwise-device", "check-config", "--config", str(path))
    refusal = agent_refusal(path)
    assert (checked.returncode == 0) == (refusal is None), (
        f"planner = {planner!r}: check-config exits {checked.returncode} ({checked.stderr.strip() or 'OK'}) "
        f"but the agent {'runs it' if refusal is None else 'refuses it: ' + refusal}"
    )
    if refusal is not None and planner in PLANNER_NAMES:
        # splitwise-rl without a policy for this model and machine (none configured, none shipped).
        assert planner == "splitwise-rl" and len(checked.stderr.splitlines()) == 1
        assert checked.stderr.startswith(f"{path}: planning.policy: ")
    elif refusal is not None:
        # One problem, named by its key path, listing what the agent can run.
        choices = ", ".join(repr(name) for name in (*PLANNER_NAMES, "fixed")[:-1])
        assert checked.stderr.splitlines() == [
            f"{path}: agent.planner: must be one of {choices} or 'fixed' (got {planner!r})"
        ]
