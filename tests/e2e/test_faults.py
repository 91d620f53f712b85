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

from cloud_offload.protocol import topics
from tests.e2e.conftest import DEVICE_ID, POOL, PROBE_FRAME, WORKER_CLIENT, Asked, System

# Up to 89 s per test measured (the queued-requests one) with 4 busy loops beside other test runs
# on 2 cores (load average 8.6): more than pytest-timeout's default 120 s leaves room for.
pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(300)]

PROMPT = "Tell me a fun fact about octopuses."
MAX_TOKENS = 40
EVENT_KINDS = {"retry", "worker_banned", "failover", "replay", "edge_fallback", "worker_error"}
# How long a request may take once a fault hit it: up to max_tries segment timeouts (4 × 5 s), then
# the rest of the generation (through the cloud or on the edge), slower on a loaded machine. Only a
# failing test waits this long; well below the test's timeout, so the failure shows the logs.
FINAL_WITHIN_S = 90


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

    final = check_final(asked.wait(FINAL_WITHIN_S), expected)
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
        system.pause_worker(victim)
        try:
            final = check_final(asked.wait(FINAL_WITHIN_S), expected)
        finally:
            system.workers[victim].resume()
        events = final["recovery"]
        print(f"hung worker {victim}:", events)
        assert final["plan"]["fell_back_to_edge"] is False, events
        assert any(e["kind"] == "worker_banned" and e["worker"] == victim for e in events), events
        replays = [e for e in events if e["kind"] == "replay"]
        assert replays and all(e["worker"] != victim for e in replays), events


def test_pool_hands_the_retry_to_the_hung_worker(logged_system: System, reference: Any) -> None:
    """After the ban the session's next attempt goes to the pool, and the shared subscription may
    hand it to the hung worker itself (its connection is still up). The attempt after that reaches
    the live worker, which answers `unknown_session`: the replay must still get its resend, within
    the same retry budget (max_tries 4: 2 to the hung worker, 2 to the pool).

    The test lines the pool's round robin up so that this happens, and checks that it did: the
    broker's packet log has a segment attempt of the device going out on the pool topic to the
    hung worker between the app's "paused" and "resumed" markers, and once resumed the worker
    answers an attempt that only ever went out on the pool topic (its CorrelationData)."""
    system = logged_system
    pool = topics.pool_segment_topic(POOL)
    expected = reference(PROMPT, MAX_TOKENS)
    system.start_worker("w1", wait=False)
    system.start_worker("w2", wait=False)
    system.wait_workers()
    system.start_agent()

    asked = system.app.ask(infer())
    asked.wait_chunks(3, timeout=60)
    victim = system.serving_worker()
    survivor = ({"w1", "w2"} - {victim}).pop()
    system.pause_worker(victim)
    paused = system.app.mark("paused")
    paused_at = time.monotonic()
    try:
        # Line up the round robin: once the live worker took a probe, the next pool message goes
        # to the hung one. (The edge's first two attempts go to the victim's own topic.)
        probes: list[str] = []
        while survivor not in probes:
            assert len(probes) < 2, probes
            probes.append(system.probe_pool())
        final = check_final(asked.wait(FINAL_WITHIN_S), expected)
        served = system.app.workers_seen(since=paused_at)
    finally:
        resumed = system.app.mark("resumed")
        resumed_at = time.monotonic()
        system.workers[victim].resume()
    events = final["recovery"]
    print("pool handed the retry to the hung worker:", events)

    # The broker handed a segment attempt of the device, on the pool topic, to the stopped worker.
    log = system.broker_log
    first, last = log.marker(paused), log.marker(resumed)
    publishes = log.publishes()
    handed = []
    for p in publishes[first:last]:
        if not p.incoming and p.topic == pool and p.client == WORKER_CLIENT + victim:
            source = next(q for q in reversed(publishes[: p.index]) if q.incoming and q.topic == pool)
            handed.append((source.client, p.size))
    attempts = [size for client, size in handed if client == f"splitwise-device-{DEVICE_ID}"]
    assert attempts and len(PROBE_FRAME) not in attempts, (victim, probes, handed)
    # And the worker got it: resumed, it answers (late) an attempt that only went out on the pool
    # topic; every attempt has CorrelationData of its own.
    app = system.app
    on_pool = {r.correlation for r in app.segment_requests if r.topic == pool and r.at >= paused_at}
    app.wait_for(
        lambda: any(r.worker == victim and r.correlation in on_pool and r.at > resumed_at for r in app.segment_replies),
        30,
        f"{victim}, resumed, answers a segment attempt it was handed on the pool topic",
    )

    # The request completed through the survivor, within the retry budget.
    assert final["plan"]["fell_back_to_edge"] is False, events
    assert served and set(served) == {survivor}, served
    story = iter((e["kind"], e["worker"]) for e in events)
    # In this order: two silent attempts on the victim's topic, its ban, the silent pool attempt
    # (the one the hung worker got), the replay to the survivor.
    steps = [("retry", victim), ("retry", victim), ("worker_banned", victim), ("retry", None), ("replay", survivor)]
    assert all(step in story for step in steps), events


def test_sigkill_only_worker_falls_back_to_edge(system: System, reference: Any) -> None:
    expected = reference(PROMPT, MAX_TOKENS)
    system.start_worker("w1")
    system.start_agent()

    asked = system.app.ask(infer())
    asked.wait_chunks(3, timeout=60)
    system.workers[system.serving_worker()].kill()

    final = check_final(asked.wait(FINAL_WITHIN_S), expected)
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

    final = check_final(asked.wait(FINAL_WITHIN_S), expected)
    print("broker restart recovery:", final["plan"]["fell_back_to_edge"], final["recovery"])
    check_final(queued.wait(FINAL_WITHIN_S), reference(PROMPT, 16))
    # Both services come back (retained status again after the broker forgot everything).
    system.app.wait_status(topics.device_status_topic(DEVICE_ID), "online", 20, system.procs)
    system.app.wait_status(topics.worker_status_topic("w1"), "online", 20, system.procs)
    # And serve the next request through the cloud again.
    again = system.app.ask(infer(max_tokens=8))
    final = check_final(again.wait(FINAL_WITHIN_S), reference(PROMPT, 8))
    assert final["plan"]["fell_back_to_edge"] is False


def test_ten_second_cloud_link_outage(system: System, reference: Any) -> None:
    expected = reference(PROMPT, MAX_TOKENS)
    proxy = system.proxy()
    system.start_worker("w1", broker_url=proxy.url)
    # A retry budget (12 × ~5.3 s, segment timeout plus backoff) well beyond the outage plus paho's
    # reconnect backoff (1, 2, 4, 8 s: the worker is back ~15 s after the cut): the worker comes back
    # and the edge resumes with it instead of falling back.
    system.start_agent(recovery={"max_tries": 12})

    asked = system.app.ask(infer())
    asked.wait_chunks(3, timeout=60)
    proxy.cut()
    cut_at = time.monotonic()
    time.sleep(10)
    assert not asked.done.is_set(), "the request finished before the outage ended"
    proxy.restore()

    final = check_final(asked.wait(FINAL_WITHIN_S), expected)
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
        a.wait_final(FINAL_WITHIN_S)
    # A barrier instead of a pause: the agent serves its queue in order and publishes every reply on
    # one connection, so whatever it sent for the three requests (a duplicate final, a re-run after
    # the kill) reaches the app before the final of a request asked after them.
    check_final(system.app.ask(infer(max_tokens=1)).wait(FINAL_WITHIN_S), reference(PROMPT, 1))
    finals = [check_final(a, e) for a, e in zip(asked, expected, strict=True)]
    assert system.app.unmatched == []
    first = finals[0]["recovery"]
    assert any(e["kind"] == "worker_banned" and e["worker"] == victim for e in first), first
    assert any(e["kind"] == "replay" for e in first), first
    assert not any(f["plan"]["fell_back_to_edge"] for f in finals)
