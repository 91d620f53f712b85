"""Configuration of a cloud worker (``cloud.toml``).

Same rules as the device config (:mod:`splitwise_core.config`): strict pydantic v2 models,
unknown keys rejected with their exact path, all problems reported at once with the file name,
relative paths taken relative to the config file. ``[broker]`` and ``[logging]`` are the very
models the device uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, ValidationInfo

from cloud_offload.protocol import frames
from splitwise_core.config import (
    BrokerConfig,
    ByteSize,
    ConfigError,
    ConfigPath,
    Identifier,
    LoggingConfig,
    Seconds,
    StrictSection,
    broker_file_problems,
    broker_summary,
    config_path,
    format_size,
    load_toml_model,
    model_problems,
)
from splitwise_core.profile import profile_file_problems

# The worker's defaults, one place for the config file and for `serve --broker --model` (CloudWorker).
DEFAULT_SESSION_TTL_S = 300.0
DEFAULT_KV_MEMORY_CAP = 1 << 30
DEFAULT_MAX_SESSIONS = 64
DEFAULT_MAX_FRAMES_PER_S_PER_DEVICE = 1000.0
DEFAULT_FRAME_BURST_PER_DEVICE = 2000
"""A device decoding with every layer's heads split sends one frame per layer per token (30 for
SmolLM2) one after the other: on a LAN round trip of ~1 ms that is up to ~1000 frames/s, and a
prompt plus a few dozen tokens fit in the burst. A device sending faster is refused."""
DEFAULT_MAX_QUEUED_BYTES = 256 << 20
"""Payload bytes that may wait in the inbox; beyond, frames are refused ``overloaded`` on arrival.
Room for ~80 of the largest frames (512 rows × n_ff in f32, 3 MiB for SmolLM2) or ~100,000 decode frames."""

PROFILE_MODES = ("measure", "off")


def _profile_source(value: object, info: ValidationInfo) -> str | Path:
    if isinstance(value, str) and value in PROFILE_MODES:
        return value
    if not isinstance(value, str | os.PathLike) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"expected 'measure', 'off' or the path of a profile JSON file (got {value!r})")
    return config_path(value, info)


ProfileSource = Annotated[str | Path, BeforeValidator(_profile_source)]
"""``"measure"``, ``"off"`` or a profile JSON file (relative to the config file's directory)."""

__all__ = ["CloudConfig", "ConfigError", "WorkerSection", "load_cloud_config"]


class WorkerSection(StrictSection):
    """``[worker]``: who this worker is, which pool it serves and what it may hold."""

    id: Identifier
    """Worker id, unique per broker: sessions pinned to this worker use
    ``splitwise/v1/cloud/worker/{id}/segment``. Required."""
    pool: Identifier = "default"
    """Pool this worker serves (shared subscription ``$share/{pool}/splitwise/v1/cloud/{pool}/segment``)."""
    model: ConfigPath
    """GGUF model file or shard directory; must be the same model (hash) the devices run. Required."""
    threads: int | None = Field(default=None, ge=1, le=256)
    """Compute threads (1-256). Default: all CPUs this process may use."""
    session_ttl_s: Seconds = DEFAULT_SESSION_TTL_S
    """An idle session's KV is dropped after this many seconds."""
    kv_memory_cap: ByteSize = Field(default=DEFAULT_KV_MEMORY_CAP, ge=1)
    """Memory for all sessions' KV caches (bytes or "1GiB"); past it, least recently used sessions are
    dropped (their devices rebuild them from checkpoints)."""
    max_sessions: int = Field(default=DEFAULT_MAX_SESSIONS, ge=1, le=1_000_000)
    """Most sessions held at once; new sessions beyond it evict the least recently used one."""
    max_rows_per_frame: int = Field(default=frames.DEFAULT_MAX_ROWS_PER_FRAME, ge=1, le=1_000_000)
    """Most tensor rows (tokens) one request frame may carry (1-1,000,000); a bigger frame is refused
    ``bad_frame`` (``too_many_rows``) before any work. Attention over T rows costs O(T²) on the
    worker's only compute thread: 512 (llama.cpp's default batch) keeps one frame well under a second
    per layer. Frames past the model's context are refused whatever this says."""
    max_frames_per_s_per_device: float = Field(default=DEFAULT_MAX_FRAMES_PER_S_PER_DEVICE, gt=0, le=1e9)
    """Frames per second one device may send this worker (token bucket per device, named by its reply
    topic); beyond it frames are refused ``overloaded`` before they are decoded, so one device cannot
    starve the pool. 1000 lets a device round-trip a frame per layer per token on a fast LAN."""
    frame_burst_per_device: int = Field(default=DEFAULT_FRAME_BURST_PER_DEVICE, ge=1, le=1_000_000_000)
    """How many frames a device may send at once above that rate (the bucket's size)."""
    max_queued_bytes: ByteSize = Field(default=DEFAULT_MAX_QUEUED_BYTES, ge=1)
    """Frame bytes that may wait for the compute thread (bytes or "256MiB"); beyond it frames are
    refused ``overloaded`` on arrival. Frames larger than any this worker could compute (from
    max_rows_per_frame) are refused ``bad_frame`` (``too_large``) on arrival too, never queued."""
    profile: ProfileSource = "measure"
    """The cost profile this worker publishes (retained, ``splitwise/v1/cloud/{pool}/profile/{id}``):
    "measure" (the profiler's quick settings, in the background after start, a few seconds), "off",
    or a profile JSON file to publish as is (e.g. measured once for a fleet of identical machines)."""


class CloudConfig(StrictSection):
    """The whole ``cloud.toml``."""

    worker: WorkerSection
    broker: BrokerConfig = BrokerConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"splitwise-cloud-{self.worker.id}"

    def check_files(self) -> list[str]:
        """Problems with the files this config points to (model, TLS, password file)."""
        problems = [f"worker.model: {p}" for p in model_problems(self.worker.model)]
        return problems + self.profile_problems() + broker_file_problems(self.broker)

    def profile_problems(self) -> list[str]:
        """Problems with ``worker.profile`` when it names a file (unreadable, not a profile)."""
        profile = self.worker.profile
        if isinstance(profile, Path):
            return [f"worker.profile: {p}" for p in profile_file_problems(profile)]
        return []

    def summary(self) -> list[str]:
        """A few human-readable lines about the effective settings (for ``check-config``)."""
        w = self.worker
        threads = str(w.threads) if w.threads is not None else "auto"
        return [
            f"worker    id={w.id} pool={w.pool} model={w.model} threads={threads}",
            f"          sessions<={w.max_sessions} kv_memory_cap={format_size(w.kv_memory_cap)} "
            f"session_ttl={w.session_ttl_s:g}s profile={w.profile}",
            f"          max_rows_per_frame={w.max_rows_per_frame} "
            f"frames/s per device<={w.max_frames_per_s_per_device:g} (burst {w.frame_burst_per_device}) "
            f"max_queued={format_size(w.max_queued_bytes)}",
            f"broker    {broker_summary(self.broker, self.client_id)}",
            f"logging   level={self.logging.level}",
        ]


def load_cloud_config(path: str | os.PathLike[str]) -> CloudConfig:
    """Loads and validates ``cloud.toml``; every problem is reported in one :class:`ConfigError`."""
    return load_toml_model(path, CloudConfig)
