"""`splitwise-device profile` and the device profiles in deploy/profiles."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from splitwise_core.profile import Profile
from splitwise_core.profiler import Settings, _fit_affine, _kl, measure, to_profile
from splitwise_device.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "deploy" / "profiles"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Profile, dict[str, Any]]:
    out = tmp_path_factory.mktemp("profile")
    assert main(["profile", "--quick", "--out", str(out / "p.json"), "--raw", str(out / "raw.json")]) == 0
    return Profile.load(out / "p.json"), json.loads((out / "raw.json").read_text())


def test_quick_profile_writes_a_valid_cost_model_profile(quick: tuple[Profile, dict[str, Any]]) -> None:
    profile, raw = quick
    assert profile.threads == 1 and profile.version == 1
    assert profile.attention.heads == [1, 3, 9] and profile.attention.context == [1, 256, 1024]
    positive = [
        profile.kv_group_s,
        profile.ffn_full_s,
        profile.ffn_gate_up_s,
        profile.ffn_down_s,
        profile.norm_s,
        profile.add_s,
        profile.embed_s,
        profile.lm_head_s,
    ]
    assert all(v > 0 for v in positive)
    assert all(v > 0 for row in profile.attention.seconds for v in row)
    assert set(profile.codecs) == {"f32", "f16", "q8_0", "q4_0"}
    assert all(c.encode_s_per_byte > 0 and c.decode_s_per_byte > 0 for c in profile.codecs.values())
    assert profile.prefill.prompt_lengths[0] == 1 and profile.prefill.per_token_factor[0] == 1.0
    # what was measured and what was not is said in the file
    assert profile.provenance["attention"] == "measured" and profile.provenance["power"] == "assumed"
    assert "power NOT measured" in profile.note and "layer" in profile.note
    assert raw["model"]["sha256"] in profile.note
    assert raw["machine"]["cpu_model"] and raw["machine"]["threads"] == 1 and raw["machine"]["date"]
    assert raw["seconds_total"] < 30  # --quick is meant for ~10 s


def test_robust_cost_orderings(quick: tuple[Profile, dict[str, Any]]) -> None:
    profile, _ = quick
    att = profile.attention.seconds
    assert att[-1][-1] > att[0][0]  # 9 heads at ctx 1024 cost more than 1 head at ctx 1
    assert att[-1][-1] > att[-1][0]  # all heads: long context costs more
    assert att[-1][-1] > att[0][-1]  # ctx 1024: all heads cost more than one
    assert profile.ffn_full_s > profile.ffn_down_s
    assert profile.lm_head_s > profile.norm_s  # 49152 × 576 matmul vs a 576-vector norm


def test_codec_accuracy_is_measured_and_ordered(quick: tuple[Profile, dict[str, Any]]) -> None:
    kl = quick[0].codec_kl
    assert kl["f32"] == 0.0  # lossless
    assert 0 < kl["q8_0"] < kl["q4_0"]


def test_profile_drives_the_cost_model(quick: tuple[Profile, dict[str, Any]]) -> None:
    """The measured profile predicts an edge-only request close to a real whole-model decode step."""
    from policies.cost import Observation, predict
    from policies.plan import edge_only
    from policies.segments import ModelDims

    profile, raw = quick
    dims = ModelDims.from_config(raw["model"]["config"])
    obs = Observation(bandwidth_bps=10e6, rtt_s=0.02, prompt_len=16, max_tokens=8)
    pred = predict(edge_only(dims.n_layer, dims.n_head), obs, profile, profile, dims, "q8_0")
    assert pred.latency_s > 0 and pred.decode_s_per_token > 0
    # ~n_layer × layer + LM head: within a factor of 3 of the measured per-token layer sum
    per_token = dims.n_layer * raw["layer_decode_s"]["1"] + raw["lm_head_s"]
    assert per_token / 3 < pred.decode_s_per_token < 3 * per_token


def test_to_profile_round_trips_through_json(tmp_path: Path) -> None:
    from splitwise_core.tokenizer import bundled_model_path

    tiny = Settings(
        contexts=(1, 8), all_heads=False, prompt_lengths=(1, 4), codec_sizes=(1,), reps=1, kl_boundaries=1,
        check_layers=False, cold_cache=False,
    )  # fmt: skip
    steps: list[str] = []
    m = measure(bundled_model_path(), 1, tiny, progress=lambda i, n, label: steps.append(f"[{i}/{n}] {label}"))
    assert steps[0].startswith("[1/") and "attention" in steps[0]
    profile = to_profile(m)
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile
    json.dumps(m.to_json())  # the raw measurement is plain JSON


def test_fit_and_kl_helpers() -> None:
    overhead, per_byte = _fit_affine([100, 1000, 10000], [2e-6 + 1e-9 * 100, 2e-6 + 1e-9 * 1000, 2e-6 + 1e-9 * 10000])
    assert overhead == pytest.approx(2e-6) and per_byte == pytest.approx(1e-9)
    import numpy as np

    a = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)
    assert _kl(a, a) == pytest.approx(0.0, abs=1e-12)
    assert _kl(a, a[:, ::-1].copy()) > 0


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("splitwise-device")
    assert exe is not None
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_cli_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("profile", "--quick", "--model", "/nonexistent/model.gguf", "--out", str(tmp_path / "p.json"))
    assert result.returncode == 1
    assert "model not found: /nonexistent/model.gguf" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--threads", "x"], ["--nope"]])
def test_cli_bad_arguments_exit_2(bad: list[str]) -> None:
    result = run_cli("profile", *bad)
    assert result.returncode == 2 and "error" in result.stderr


def test_cli_bad_model_file_is_reported(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    result = run_cli("profile", "--quick", "--model", str(junk), "--out", str(tmp_path / "p.json"))
    assert result.returncode == 1 and "Traceback" not in result.stderr and "error" in result.stderr


# -- deploy/profiles --------------------------------------------------------------------------


def _figures(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every {value, ...} object in a device profile, with its JSON path."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if "value" in node:
            return [(path, node)]
        for k, v in node.items():
            found += _figures(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _figures(v, f"{path}[{i}]")
    return found


def _bare_numbers(node: Any, path: str = "") -> list[str]:
    if isinstance(node, bool):
        return []
    if isinstance(node, int | float):
        return [path]
    if isinstance(node, dict):
        if "value" in node:
            return []
        return [p for k, v in node.items() for p in _bare_numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _bare_numbers(v, f"{path}[{i}]")]
    return []


DEVICE_FILES = sorted(PROFILES.glob("*.device.json"))


def test_the_four_devices_have_profiles() -> None:
    names = {p.name for p in DEVICE_FILES}
    assert {
        "reference-vm.device.json",
        "raspberry-pi-5.device.json",
        "jetson-orin-nx.device.json",
        "galaxy-s23.device.json",
    } <= names


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.name)
def test_every_device_figure_has_a_source_or_an_explicit_null(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert doc["schema"] == "splitwise-device-profile/1" and doc["device"]
    assert not _bare_numbers(doc), f"numbers without a {{value, source}} wrapper: {_bare_numbers(doc)}"
    figures = _figures(doc)
    assert figures
    for where, fig in figures:
        assert set(fig) == {"value", "unit", "source", "note"}, where
        if fig["value"] is None:
            assert fig["source"] is None and isinstance(fig["note"], str) and fig["note"], where
        else:
            assert isinstance(fig["value"], int | float) and not isinstance(fig["value"], bool), where
            assert isinstance(fig["source"], str) and fig["source"].strip(), where
    for key in ("idle_w", "compute_w", "transmit_w"):
        assert key in doc["power"], f"{path.name}: power.{key} missing (null with a note if unknown)"


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.profile.json")), ids=lambda p: p.name)
def test_shipped_cost_model_profiles_load(path: Path) -> None:
    profile = Profile.load(path)
    assert profile.provenance.get("power") == "assumed"  # no power sensor where these were measured
    assert all(v > 0 for row in profile.attention.seconds for v in row)
