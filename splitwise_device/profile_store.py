"""The device's one owner of cost profiles: what the controller plans with and check-config checks.

- The edge profile (this device): the configured file, else one measured with the profiler's quick
  settings at first need and cached in the state directory (``profile-{model hash}-t{threads}.json``),
  so a restart does not measure again.
- The cloud profiles: those the pool's workers publish (retained, one per worker), each parsed once
  per message; a worker's profile this device cannot use is logged once and skipped. Without any,
  the configured cloud profile (``planning.cloud_profile``), if there is one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cloud_offload.profiles import WorkerProfile, WorkerProfiles
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.profile import Profile

__all__ = ["EdgeProfileSource", "ProfileStore"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeProfileSource:
    """Where the device's own profile comes from: `configured`, else measured for this model and
    thread count and cached in `cache_dir`."""

    configured: Path | None
    model_path: Path
    threads: int
    cache_dir: Path
    model_sha256_hex: str

    @property
    def cache_file(self) -> Path:
        return self.cache_dir / f"profile-{self.model_sha256_hex[:16]}-t{self.threads}.json"

    def load_or_measure(self) -> Profile:
        if self.configured is not None:
            return Profile.load(self.configured)
        cache = self.cache_file
        if cache.is_file():
            try:
                return Profile.load(cache)
            except InvalidArgumentError as err:
                log.warning("ignoring the cached profile: %s", err)
        from splitwise_core.profiler import Settings, measure, to_profile

        log.info(
            "measuring this device's profile (quick settings, %d threads); set planning.profile to skip", self.threads
        )
        measurement = measure(self.model_path, self.threads, Settings.quick())
        profile: Profile = to_profile(measurement)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            profile.save(cache)
            log.info("profile measured in %.1f s, cached in %s", measurement.seconds_total, cache)
        except OSError as err:
            log.warning("profile measured in %.1f s but not cached (%s)", measurement.seconds_total, err)
        return profile


class ProfileStore:
    """Thread-safe. `edge` is a profile or where to get one (loaded or measured once, at first
    need); `workers` the pool's published profiles; `configured_cloud` the fallback cloud profile."""

    def __init__(
        self,
        edge: Profile | EdgeProfileSource,
        *,
        workers: WorkerProfiles | None = None,
        configured_cloud: Profile | None = None,
        cloud: Mapping[str, Profile] | None = None,
    ) -> None:
        self._edge = edge if isinstance(edge, Profile) else None
        self._edge_source = edge if isinstance(edge, EdgeProfileSource) else None
        self._workers = workers
        self._configured_cloud = {"configured": configured_cloud} if configured_cloud is not None else {}
        self._given_cloud = dict(cloud or {})
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[WorkerProfile, Profile | None]] = {}

    def edge(self) -> Profile:
        """This device's profile (the first call may measure it: seconds)."""
        with self._lock:
            if self._edge is None:
                assert self._edge_source is not None
                self._edge = self._edge_source.load_or_measure()
            return self._edge

    def cloud(self) -> dict[str, Profile]:
        """The cloud profiles by worker id: the published ones, else the configured one."""
        published = dict(self._given_cloud)
        if self._workers is not None:
            with self._lock:
                for worker_id, entry in self._workers.entries().items():
                    cached = self._parsed.get(worker_id)
                    if cached is None or cached[0] is not entry:
                        try:
                            cached = (entry, Profile.model_validate(entry.profile))
                        except ValueError as err:  # pydantic's ValidationError is a ValueError
                            log.warning("worker %s published a profile this device cannot use: %s", worker_id, err)
                            cached = (entry, None)
                        self._parsed[worker_id] = cached
                    if cached[1] is not None:
                        published[worker_id] = cached[1]
        return published or dict(self._configured_cloud)

    def wait_for_published(self, timeout_s: float) -> bool:
        """Gives the workers' retained profiles, delivered right after subscribing, up to
        `timeout_s` to arrive; True if one has."""
        return self._workers is not None and self._workers.wait_for_any(timeout_s)
