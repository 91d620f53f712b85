"""A real, kernel-shaped link: a "cloud" network namespace behind a veth pair with tbf on both ends.

    with ShapedLink(rate_bps=10e6) as link:
        broker = LocalBroker(tmp, host=link.cloud_ip, command_prefix=link.prefix)
        ...  # the device side (this process, root namespace) connects to link.cloud_ip

Topology: the root namespace holds the device side and `edge_ip` (veth end "swr<pid>n<k>"); the
namespace "swc<pid>n<k>" holds `cloud_ip` (veth end "swc<pid>n<k>") and its own `lo`. A tbf qdisc
on the egress of each veth end shapes one direction: root end = uplink (device → cloud), cloud end
= downlink (cloud → device). `rate_bps=None` leaves the link unshaped (veth speed).

tbf needs a bucket at least one packet deep or it drops everything silently; the veth MTU is 1500,
and the burst is max(rate/8 × 5 ms, 16 KiB). The queue ("latency", `queue_s`) is 400 ms: a bulk
TCP sender on this host is not held back by TCP small queues here, and with 100 ms tbf dropped
~40 % of the packets of a 2 MB transfer at 10 Mbit/s (TCP retransmitted them and still reached
the rate); with 400 ms nothing was dropped. The price is up to 400 ms of queueing delay behind a
bulk transfer (bufferbloat, as on a real uplink). Segmentation offloads
(TSO/GSO) would hand tbf 64 KB super-packets, but tbf re-segments packets larger than its burst, so
this works without ethtool (measured; see docs/link-emulation.md).

Needs root (CAP_NET_ADMIN) and iproute2; `available()` says why not. Cleanup always deletes the
namespace and the root veth end, even after errors, and `ShapedLink` first removes leftovers of
killed runs (same name prefix, owner pid dead). Stop every process you started inside the
namespace before the context exits (a namespace with live processes outlives `ip netns del`).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from types import TracebackType

PREFIX_NS = "swc"
PREFIX_ROOT = "swr"
_NAME = re.compile(rf"^(?:{PREFIX_NS}|{PREFIX_ROOT})(\d+)n(?:\d+|probe)$")
_counter = itertools.count()
_usable = False  # a namespace was made once in this process: skip the probe from then on

BURST_SECONDS = 0.005
MIN_BURST_BYTES = 16 * 1024
QUEUE_SECONDS = 0.4


def available() -> str | None:
    """None when a ShapedLink can be made here, else the reason why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    global _usable
    if _usable:
        return None
    probe = f"{PREFIX_NS}{os.getpid()}nprobe"
    result = _run(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    _usable = True
    return None


_available = available


def tbf_args(rate_bps: float, queue_s: float = QUEUE_SECONDS) -> list[str]:
    """The tbf parameters for `rate_bps`: rate, a bucket ≥ one packet, a queue of `queue_s`."""
    burst = max(int(rate_bps / 8 * BURST_SECONDS), MIN_BURST_BYTES)
    latency = f"{max(1, round(queue_s * 1000))}ms"
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", latency]


class ShapedLink:
    def __init__(self, rate_bps: float | None, *, queue_s: float = QUEUE_SECONDS) -> None:
        self.rate_bps = rate_bps
        self.queue_s = queue_s
        pid = os.getpid()
        serial = next(_counter)
        self.name = f"{PREFIX_NS}{pid}n{serial}"
        self.root_dev = f"{PREFIX_ROOT}{pid}n{serial}"
        self.cloud_dev = self.name
        # A /30 out of 10.213.0.0/16 chosen from pid and serial: 16384 subnets.
        index = (pid * 8 + serial) % 16384
        base = (index % 64) * 4
        self.subnet = f"10.213.{index // 64}.{base}/30"
        self.edge_ip = f"10.213.{index // 64}.{base + 1}"
        self.cloud_ip = f"10.213.{index // 64}.{base + 2}"
        self._up = False

    @staticmethod
    def available() -> str | None:
        """None when a ShapedLink can be made here, else the reason why not (= module `available()`)."""
        return _available()

    @property
    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside the cloud namespace."""
        return ["ip", "netns", "exec", self.name]

    def start(self) -> ShapedLink:
        reason = available()
        if reason is not None:
            raise RuntimeError(f"ShapedLink unavailable: {reason}")
        cleanup_stale()
        self._up = True
        try:
            _run(["ip", "netns", "add", self.name])
            _run(["ip", "link", "add", self.root_dev, "type", "veth", "peer", "name", self.cloud_dev])
            _run(["ip", "link", "set", self.cloud_dev, "netns", self.name])
            _run(["ip", "addr", "add", f"{self.edge_ip}/30", "dev", self.root_dev])
            _run(["ip", "link", "set", self.root_dev, "mtu", "1500", "up"])
            _run([*self.prefix, "ip", "addr", "add", f"{self.cloud_ip}/30", "dev", self.cloud_dev])
            _run([*self.prefix, "ip", "link", "set", self.cloud_dev, "mtu", "1500", "up"])
            _run([*self.prefix, "ip", "link", "set", "lo", "up"])
            self.set_rate(self.rate_bps)
        except BaseException:
            self.close()
            raise
        return self

    def set_rate(self, rate_bps: float | None) -> None:
        """Changes the rate of both directions (None = unshaped)."""
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate_bps must be positive or None, not {rate_bps}")
        for prefix, dev in (([], self.root_dev), (self.prefix, self.cloud_dev)):
            if rate_bps is None:
                _run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
            else:
                _run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *tbf_args(rate_bps, self.queue_s)])
        self.rate_bps = rate_bps

    def qdisc(self) -> str:
        """`tc -s qdisc` of both ends (for diagnostics)."""
        root = _run(["tc", "-s", "qdisc", "show", "dev", self.root_dev], check=False).stdout
        cloud = _run([*self.prefix, "tc", "-s", "qdisc", "show", "dev", self.cloud_dev], check=False).stdout
        return f"uplink ({self.root_dev}):\n{root}downlink ({self.cloud_dev}):\n{cloud}"

    def close(self) -> None:
        if not self._up:
            return
        self._up = False
        _delete(self.name, self.root_dev)

    def __enter__(self) -> ShapedLink:
        return self.start()

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


def namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def root_links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    # "12: swr123n0@if11: <...>"
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2]


def cleanup_stale() -> list[str]:
    """Deletes namespaces and veth ends of ShapedLinks whose owner process is gone; returns them."""
    removed: list[str] = []
    for name in [*namespaces(), *root_links()]:
        match = _NAME.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if name.startswith(PREFIX_NS):
            _run(["ip", "netns", "del", name], check=False)
        else:
            _run(["ip", "link", "del", name], check=False)
        removed.append(name)
    return removed


def _delete(namespace: str, root_dev: str) -> None:
    # Deleting one veth end deletes its peer; the namespace goes with its last reference.
    _run(["ip", "link", "del", root_dev], check=False)
    _run(["ip", "netns", "del", namespace], check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


__all__ = ["ShapedLink", "available", "cleanup_stale", "tbf_args"]
