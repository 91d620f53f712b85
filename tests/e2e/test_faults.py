"""Fault tests with real processes: SIGKILLed workers, a restarted broker, a cut cloud link.

Every request must complete with a well-formed final reply whose text is the local greedy text
(codec f32), and no accepted request may be lost.

Exact text equality is fair here: with the f32 codec the split plan moves whole fused layers, and
the engine is batch-invariant (re-prefilling the history, as the edge fallback does, gives
bit-identical logits to incremental decoding). The prompts also keep clear of near-ties: the
smallest top-1/top-2 logit margin along the local greedy trajectory is 0.158 (PROMPT, 40 tokens),
0.115 and 0.166 (the two others, 16 tokens). "Write a short poem about the sea." (margin 0.002)
would be a bad choice.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from cloud_offload import protocol
from tests.e2e.conftest import DEVICE_ID, Asked, System

pytestmark = [pytest.mark.slow, pytest.mark.broker]

PROMPT = "Tell me a fun fact about octopuses."
MAX_TOKENS = 40
EVENT_KINDS = {"retry", "worker_banned", "failover", "replay", "edge_fallback", "worker_error"}


def infer(max_tokens: int = MAX_TOKENS, plan: str = "layer-split:10", content: str = PROMPT) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "plan": plan,
    }


def check_final(asked: Asked, expected: Any) -> dict[str, Any]:
    """One final reply, well-formed, its chunks in order and complete, the local greedy text."""
    assert len(asked.finals) == 1, asked.replies
    final = asked.finals[0]
    assert final["type"] == "final", final
    assert isinstance(final["text"], str)
    assert final["tokens"]["prompt"] == len(expected.prompt_tokens)
    assert final["tokens"]["completion"] == len(expected.tokens)
    assert final["stop_reason"] in ("eos", "max_tokens", "context")
    assert isinstance(final["plan"], dict) and isinstance(final["plan"]["fell_back_to_edge"], bool)
    assert {"queue_s", "total_s", "prefill_s"} <= set(final["timings"])
    for event in final["recovery"]:
        assert set(event) == {"kind", "step", "segment", "worker", "detail"}, event
        assert event["kind"] in EVENT_KINDS, event
    chunks = asked.chunks
    for chunk in chunks:
        assert set(chunk) == {"type", "index", "text"} and isinstance(chunk["text"], str) and chunk["text"], chunk
    assert [c["index"] for c in chunks] == list(range(len(chunks))), [c["index"] for c in chunks]
    assert asked.replies[-1] is final, "a chunk arrived after the final reply"
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert final["text"] == expected.text, (final["text"], expected.text, final["recovery"])
    return final


def kinds(final: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in final["recovery"]]


@pytest.mark.parametrize("plan", ["layer-split:10", "cloud-only", "heads:4"])
def test_sigkill_serving_worker_fails_over_to_the_second(system: System, reference: Any, plan: str) -> None:
    expected = reference(PROMPT, MAX_TOKENS)
    system.start_worker("w1", wait=False)
    system.start_worker("w2", wait=False)
    system.wait_workers()
    system.start_agent()

    asked = system.app.ask(infer(plan=plan))
    asked.wait_chunks(3, timeout=60)
    victim = system.serving_worker()
    system.workers[victim].kill()
    survivor = ({"w1", "w2"} - {victim}).pop()

    final = check_final(asked.wait(60), expected)
    print("failover recovery:", final["recovery"])
    assert len(asked.chunks) >= 3
    assert final["plan"]["fell_back_to_edge"] is False, final["recovery"]
    events = final["recovery"]
    assert any(e["kind"] == "worker_banned" and e["worker"] == victim for e in events), events
    assert any(e["kind"] == "replay" and e["worker"] == survivor for e in events), events
    assert "edge_fallback" not in kinds(final)
    # The survivor served the rest of the request.
    assert system.app.workers_seen()[-1] == survivor


def test_hung_worker_is_banned_and_the_session_moves(system: System, reference: Any) -> None:
    """SIGSTOP keeps the worker's connection (and its shared subscription) up but silent. Twice in a
    row, so that the second request meets a pool where the first victim is still banned yet alive
    again, and still gets pool messages from the shared subscription."""
    expected = reference(PROMPT, MAX_TOKENS)
    system.start_worker("w1", wait=False)
    system.start_worker("w2", wait=False)
    system.wait_workers()
    system.start_agent()

    for _round in range(2):
        asked = system.app.ask(infer())
        asked.wait_chunks(3, timeout=60)
        victim = system.serving_worker()
        system.workers[victim].pause()
        try:
            final = check_final(asked.wait(60), expected)
        finally:
            system.workers[victim].resume()
        events = final["recovery"]
        print(f"hung worker {victim}:", events)
        assert final["plan"]["fell_back_to_edge"] is False, events
        assert any(e["kind"] == "worker_banned" and e["worker"] == victim for e in events), events
        replays = [e for e in events if e["kind"] == "replay"]
        assert replays and all(e["worker"] != victim for e in replays), events


def test_pool_hands_the_retry_to_the_hung_worker(system: System, reference: Any) -> None:
    """After the ban the session's next attempt goes to the pool, and the shared subscription may
    hand it to the hung worker itself (its connection is still up). The attempt after that reaches
    the live worker, which answers `unknown_session`: the replay must still get its resend, within
    the same retry budget (max_tries 4: 2 to the hung worker, 2 to the pool)."""
    expected = reference(PROMPT, MAX_TOKENS)
    system.start_worker("w1", wait=False)
    system.start_worker("w2", wait=False)
    system.wait_workers()
    system.start_agent()

    asked = system.app.ask(infer())
    asked.wait_chunks(3, timeout=60)
    victim = system.serving_worker()
    survivor = ({"w1", "w2"} - {victim}).pop()
    system.workers[victim].pause()
    try:
        # Line up the round robin: once the live worker took a probe, the next pool message goes
        # to the hung one. (The edge's first two attempts go to the victim's own topic.)
        probes: list[str | None] = []
        while survivor not in probes:
            assert len(probes) < 3, probes
            probes.append(system.app.probe_pool())
        final = check_final(asked.wait(60), expected)
    finally:
        system.workers[victim].resume()
    events = final["recovery"]
    print("pool handed the retry to the hung worker:", events)
    assert final["plan"]["fell_back_to_edge"] is False, events
    assert any(e["kind"] == "worker_banned" and e["worker"] == victim for e in events), events
    assert any(e["kind"] == "replay" and e["worker"] == survivor for e in events), events


def test_sigkill_only_worker_falls_back_to_edge(system: System, reference: Any) -> None:
    expected = reference(PROMPT, MAX_TOKENS)
    system.start_worker("w1")
    system.start_agent()

    asked = system.app.ask(infer())
    asked.wait_chunks(3, timeout=60)
    system.workers[system.serving_worker()].kill()

    final = check_final(asked.wait(60), expected)
    print("edge fallback recovery:", final["recovery"])
    assert final["plan"]["fell_back_to_edge"] is True, final["recovery"]
    assert "edge_fallback" in kinds(final)
    assert any(e["kind"] == "worker_banned" and e["worker"] == "w1" for e in final["recovery"])


def test_broker_restart_mid_request(system: System, reference: Any) -> None:
    expected = reference(PROMPT, MAX_TOKENS)
    system.start_worker("w1")
    system.start_agent()

    asked = system.app.ask(infer())
    queued = system.app.ask(infer(max_tokens=16))  # accepted, waits in the agent's queue
    asked.wait_chunks(3, timeout=60)
    system.broker.stop()
    assert not asked.done.is_set() and not queued.replies
    system.app.status.clear()  # the restarted broker has no retained status: see them come back
    system.broker.start()

    final = check_final(asked.wait(60), expected)
    print("broker restart recovery:", final["plan"]["fell_back_to_edge"], final["recovery"])
    check_final(queued.wait(60), reference(PROMPT, 16))
    # Both services come back (retained status again after the broker forgot everything).
    system.app.wait_status(protocol.device_status_topic(DEVICE_ID), "online", 20, system.procs)
    system.app.wait_status(protocol.worker_status_topic("w1"), "online", 20, system.procs)
    # And serve the next request through the cloud again.
    again = system.app.ask(infer(max_tokens=8))
    final = check_final(again.wait(60), reference(PROMPT, 8))
    assert final["plan"]["fell_back_to_edge"] is False


def test_ten_second_cloud_link_outage(system: System, reference: Any) -> None:
    expected = reference(PROMPT, MAX_TOKENS)
    proxy = system.proxy()
    system.start_worker("w1", broker_url=proxy.url)
    # A retry budget (~40 × 1.5 s) longer than the outage plus paho's reconnect backoff (1, 2, 4, 8 s):
    # the worker comes back and the edge resumes with it instead of falling back.
    system.start_agent(recovery={"max_tries": 40})

    asked = system.app.ask(infer())
    asked.wait_chunks(3, timeout=60)
    proxy.cut()
    cut_at = time.monotonic()
    time.sleep(10)
    assert not asked.done.is_set(), "the request finished before the outage ended"
    proxy.restore()

    final = check_final(asked.wait(90), expected)
    took = time.monotonic() - cut_at
    print(f"link outage: final {took:.1f}s after the cut; recovery {final['recovery']}")
    assert proxy.dropped >= 1 and proxy.refused >= 1
    assert final["plan"]["fell_back_to_edge"] is False, final["recovery"]
    assert "retry" in kinds(final)
    assert system.app.workers_seen(since=cut_at + 10)[-1:] == ["w1"]


def test_queued_requests_survive_a_worker_kill(system: System, reference: Any) -> None:
    # The first request runs long enough to be killed mid-way; the other two wait in the queue.
    work = [(PROMPT, MAX_TOKENS), ("Explain why the sky is blue.", 16), ("Write a haiku about autumn leaves.", 16)]
    expected = [reference(p, n) for p, n in work]
    system.start_worker("w1", wait=False)
    system.start_worker("w2", wait=False)
    system.wait_workers()
    system.start_agent()

    asked = [system.app.ask(infer(max_tokens=n, content=p)) for p, n in work]
    asked[0].wait_chunks(3, timeout=60)
    victim = system.serving_worker()
    system.workers[victim].kill()

    for a in asked:
        a.wait_final(90)
    time.sleep(0.5)  # anything duplicated would arrive now
    finals = [check_final(a, e) for a, e in zip(asked, expected, strict=True)]
    assert system.app.unmatched == []
    first = finals[0]["recovery"]
    assert any(e["kind"] == "worker_banned" and e["worker"] == victim for e in first), first
    assert any(e["kind"] == "replay" for e in first), first
    assert not any(f["plan"]["fell_back_to_edge"] for f in finals)
