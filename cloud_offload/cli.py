"""Command line of the cloud worker: ``splitwise-cloud <command>``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitwise_device import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitwise-cloud",
        description="Splitwise cloud worker: runs the offloaded parts of edge devices' plans.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("splitwise-cloud: no worker service in this build yet; see `splitwise-cloud --help`.")
    return 2


if __name__ == "__main__":
    sys.exit(main())
