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
