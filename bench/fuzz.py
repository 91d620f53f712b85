"""Fuzz the front door for long runs: thousands of malformed requests at a device agent and
corrupted frames at two cloud workers (real mosquitto and processes), in identical rounds.

Prints, per round, the outcome counts by category (clear error / answered / documented silence /
unexpected reply / unexpected silence), topics published outside the namespace, whether the
processes are alive, whether a normal request still succeeds, and every process's private memory
(resident anonymous: what a leak grows) and RSS (which also counts the model file's pages as they
are touched); then both changes from the first round to the last. tests/integration/test_fuzz.py is the bounded CI
version of the same run.
Run: python bench/fuzz.py [--payloads 1000] [--frames 1000] [--rounds 2] [--seed N]
     [--worker-max-sessions N] [--worker-session-ttl S] [--worker-max-queued-bytes B]
     [--worker-kv-memory-cap B]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.fuzz import ask_normally, fuzz_round, fuzz_system


def progress(what: str, done: int, total: int) -> None:
    if done % 100 == 0 or done == total:
        print(f"  {what}: {done}/{total} sent", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=1000, help="requests per round (default 1000)")
    parser.add_argument("--frames", type=int, default=1000, help="frames per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds without a new reply that end a wait")
    parser.add_argument(
        "--worker-max-sessions", type=int, default=None, help="the workers' max_sessions (default: the config's)"
    )
    parser.add_argument(
        "--worker-session-ttl", type=float, default=None, help="the workers' session_ttl_s (default: the config's)"
    )
    parser.add_argument(
        "--worker-max-queued-bytes",
        type=int,
        default=None,
        help="the workers' max_queued_bytes (default: the config's)",
    )
    parser.add_argument(
        "--worker-kv-memory-cap",
        type=int,
        default=None,
        help="the workers' kv_memory_cap in bytes (default: the config's)",
    )
    args = parser.parse_args()
    if min(args.payloads, args.frames, args.rounds) < 1:
        parser.error("--payloads, --frames and --rounds must be at least 1")
    failures = 0
    worker_settings = {
        key: value
        for key, value in (
            ("max_sessions", args.worker_max_sessions),
            ("session_ttl_s", args.worker_session_ttl),
            ("max_queued_bytes", args.worker_max_queued_bytes),
            ("kv_memory_cap", args.worker_kv_memory_cap),
        )
        if value is not None
    }
    print(f"worker settings: {worker_settings or 'the config defaults'}")
    with tempfile.TemporaryDirectory() as tmp, fuzz_system(Path(tmp), worker_settings) as system:
        rss: list[dict[str, int]] = []
        private: list[dict[str, int]] = []
        for round_ in range(1, args.rounds + 1):
            started = time.monotonic()
            agent, workers = fuzz_round(
                system,
                f"round{round_:04d}",
                seed=args.seed,
                payloads=args.payloads,
                frames=args.frames,
                settle_s=args.settle,
                progress=progress,
            )
            alive = system.alive()
            try:
                final = ask_normally(system.broker)
                normal = f"ok ({final['tokens']['completion']} tokens)"
            except AssertionError as err:
                normal, failures = f"FAILED: {err}", failures + 1
            rss.append(system.rss() if all(alive.values()) else {})
            private.append(system.private_memory() if all(alive.values()) else {})
            for what, report in (("requests at the agent", agent), ("frames at the workers", workers)):
                print(f"\nround {round_}: {args.payloads if report is agent else args.frames} {what}")
                print(report.table())
                for defect in report.defects[:20]:
                    print(f"  defect: {defect}")
                if report.foreign_topics:
                    print(f"  published outside the namespace: {sorted(report.foreign_topics)[:10]}")
                failures += len(report.defects) + len(report.foreign_topics)
            print(f"alive: {alive}; normal request afterwards: {normal}; round took {time.monotonic() - started:.0f} s")
            print(
                "private / RSS: "
                + ", ".join(f"{k} {v / 2**20:.1f} / {rss[-1][k] / 2**20:.1f} MiB" for k, v in private[-1].items())
            )
            failures += sum(not ok for ok in alive.values())
        for label, series in (("private memory", private), ("RSS", rss)):
            if len(series) > 1 and series[0] and series[-1]:
                print(
                    f"{label} change, first round → last: "
                    + ", ".join(f"{k} {100 * (series[-1][k] / v - 1):+.1f}%" for k, v in series[0].items())
                )
    print(f"\n{'no defects' if failures == 0 else f'{failures} problems'}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
