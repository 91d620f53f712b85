"""`splitwise-device plan`: a planner's choice for a link, printed as a table or JSON."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from policies.planners.registry import PLANNER_NAMES
from splitwise_core.errors import InvalidArgumentError
from splitwise_device.planning import parse_duration, parse_rate
from tests.unit.test_cost import synthetic_profile


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("profiles")
    edge, cloud = root / "edge.json", root / "cloud.json"
    synthetic_profile("edge", speed=1.0).save(edge)
    synthetic_profile("cloud", speed=10.0).save(cloud)
    return edge, cloud


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("splitwise-device")
    assert exe is not None
    return subprocess.run([exe, "plan", *args], capture_output=True, text=True, timeout=120)


def test_table_for_one_planner(profiles: tuple[Path, Path]) -> None:
    edge, cloud = profiles
    result = plan("--profile", str(edge), "--cloud-profile", str(cloud), "--bandwidth", "100mbit", "--rtt", "5ms")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    layer_rows = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(layer_rows) == 30 and lines[-1].startswith("predicted: latency")
    assert "LM head on" in result.stdout


def test_all_planners_side_by_side_and_a_cut_link(profiles: tuple[Path, Path]) -> None:
    edge, cloud = profiles
    result = plan(
        "--profile", str(edge), "--cloud-profile", str(cloud), "--bandwidth", "0", "--rtt", "20ms", "--all", "--json"
    )
    assert result.returncode == 0, result.stderr
    rows = {r["planner"]: r for r in json.loads(result.stdout)}
    assert set(rows) == set(PLANNER_NAMES)
    for name in ("splitwise-dp", "splitwise-rl"):
        assert rows[name]["summary"]["layers"]["edge"] == 30, name  # no link: everything local
    assert math.isinf(rows["cloud-only"]["latency_s"])
    assert rows["splitwise-dp"]["objective"] <= min(r["objective"] for r in rows.values())


@pytest.mark.parametrize("bad", [["--bandwidth", "fast"], ["--rtt", "soon"], ["--planner", "magic"]])
def test_bad_arguments(profiles: tuple[Path, Path], bad: list[str]) -> None:
    edge, cloud = profiles
    args = {"--bandwidth": "10mbit", "--rtt": "20ms"}
    args.update(dict(zip(bad[::2], bad[1::2], strict=True)))
    result = plan("--profile", str(edge), "--cloud-profile", str(cloud), *[x for kv in args.items() for x in kv])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error" in result.stderr.lower()


def test_rate_and_duration_units() -> None:
    assert parse_rate("10mbit") == 10e6 and parse_rate("1.5MB/s") == 12e6 and parse_rate("0") == 0
    assert parse_duration("20ms") == pytest.approx(0.02) and parse_duration("500us") == pytest.approx(5e-4)
    assert math.isinf(parse_duration("inf"))
    for bad in ("ten", "5 parsecs"):
        with pytest.raises(InvalidArgumentError):
            parse_rate(bad)
        with pytest.raises(InvalidArgumentError):
            parse_duration(bad)
