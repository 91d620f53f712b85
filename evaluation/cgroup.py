"""A memory-limited cgroup for one benchmark child: the device of a memory-limit run.

Linux only, and only where this process may create cgroups (root, or a delegated subtree). Both
hierarchies are handled: cgroup v2 (`memory.max`, `memory.peak`) and v1's memory controller
(`memory.limit_in_bytes`, `memory.max_usage_in_bytes`). The group is made under this process's own
memory cgroup, so it also stays inside whatever limit that one has.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupUnavailable", "MemoryCgroup", "memory_cgroup"]

ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be made here; the message says why."""


@dataclass(frozen=True)
class MemoryCgroup:
    path: Path
    version: int
    limit_bytes: int

    def join(self) -> None:
        """Moves the calling process into the group (call it first thing in the child)."""
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def peak_bytes(self) -> int | None:
        """The group's peak memory use (anonymous memory and the page cache charged to it)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def limit_hits(self) -> int | None:
        """How often the group hit its limit (v1 `memory.failcnt`, v2 `max` events)."""
        try:
            if self.version == 1:
                return int((self.path / "memory.failcnt").read_text())
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            return int(events.get("max", 0))
        except (OSError, ValueError):
            return None


def _own_group(controller_line_matches: str) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if controllers == controller_line_matches or controller_line_matches in controllers.split(","):
            return path
    return None


def _parent() -> tuple[Path, int]:
    if (ROOT / "cgroup.controllers").is_file():
        own = _own_group("")
        parent = ROOT / (own or "/").lstrip("/")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            raise CgroupUnavailable(f"cgroup v2 without the memory controller enabled below {parent}")
        return parent, 2
    if (ROOT / "memory").is_dir():
        own = _own_group("memory")
        return ROOT / "memory" / (own or "/").lstrip("/"), 1
    raise CgroupUnavailable(f"no cgroup memory controller under {ROOT}")


@contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[MemoryCgroup]:
    """A new cgroup limited to `limit_bytes` of memory, removed afterwards (its processes must
    have exited by then). Raises `CgroupUnavailable` saying why when none can be made."""
    try:
        parent, version = _parent()
        path = parent / f"splitwise-bench-{uuid.uuid4().hex[:8]}"
        path.mkdir()
    except OSError as err:
        raise CgroupUnavailable(f"cannot create a cgroup: {err}") from err
    try:
        if version == 2:
            (path / "memory.max").write_text(f"{limit_bytes}\n")
            (path / "memory.swap.max").write_text("0\n")
        else:
            (path / "memory.limit_in_bytes").write_text(f"{limit_bytes}\n")
        yield MemoryCgroup(path, version, limit_bytes)
    finally:
        with suppress(OSError):  # a process still inside keeps it; nothing else to do
            path.rmdir()
