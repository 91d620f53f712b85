"""The installed console scripts work as a user would call them."""

from __future__ import annotations

import shutil
import subprocess

import pytest


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
