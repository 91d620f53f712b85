"""What a benchmark prints about the CPU it ran on: these machines differ from session to session."""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_features"]


def cpu_features() -> str:
    """The SIMD features this run had, as /proc/cpuinfo names them (these machines differ)."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.partition(":")[2].split())
    return " ".join(flag for flag in wanted if flag in have) or "none of " + " ".join(wanted)
