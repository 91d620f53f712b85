"""Role shards: one GGUF file per layer plus a base file, so a device maps only what it runs.

The Rust core writes the files (``_core.write_shards``) and checks them whenever it maps one;
this module adds the directory policy (refuse a non-empty directory unless forced) and
``manifest.json``, a convenience listing for people and tools. The loader never trusts the
manifest: it reads each shard's own ``splitwise.shard.*`` keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitwise_core._core import write_shards
from splitwise_core.errors import InvalidArgumentError, ModelFileError

__all__ = ["MANIFEST_FILE", "parse_size", "shard_model"]

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
# Files a previous `shard` run leaves; --force removes them first so no stale layer survives.
_SHARD_NAME = re.compile(r"^(base\.gguf|layer-\d{3,}\.gguf|\.(base|layer-\d{3,})\.gguf\.partial|manifest\.json)$")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes from "256MB", "1.5GiB", "4096": KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise InvalidArgumentError(f"expected a size such as 256MB, 1.5GiB or 4096 (bytes), got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidArgumentError(f"size must be positive, got {text!r}")
    return value


def shard_model(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Writes the role shards of `source` (a GGUF file or the first file of a gguf-split set)
    into `out_dir` (created if missing) and its manifest; returns the manifest.

    A non-empty `out_dir` is refused unless `force`, which first removes earlier shard files.
    """
    source_path = Path(source)
    out = Path(out_dir)
    if not source_path.is_file():
        raise ModelFileError(f"{source_path}: no such model file")
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.iterdir())
    if existing:
        if not force:
            raise InvalidArgumentError(
                f"{out} is not empty ({len(existing)} entries, e.g. {existing[0]}); "
                "choose an empty directory or pass --force to replace earlier shards"
            )
        others = [name for name in existing if not _SHARD_NAME.match(name)]
        if others:
            raise InvalidArgumentError(
                f"{out} holds files that are not shards ({', '.join(others[:3])}); refusing to write there"
            )
        for name in existing:
            (out / name).unlink()

    summary = write_shards(str(source_path), str(out), progress)
    manifest = {
        "format": "splitwise-shards",
        "version": MANIFEST_VERSION,
        "source_file": source_path.name,
        "source_sha256": summary["source_sha256"],
        "n_layer": summary["n_layer"],
        "files": [
            {
                "file": Path(shard["path"]).name,
                "role": shard["role"],
                "layer": shard["layer"],
                "bytes": shard["bytes"],
                "tensors": shard["tensors"],
            }
            for shard in summary["shards"]
        ],
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
