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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check_config = commands.add_parser(
        "check-config", help="validate a cloud.toml and the files it names (model, TLS, password)"
    )
    check_config.add_argument("--config", required=True, help="worker config file (TOML)")
    return parser


def _check_config(config: str) -> int:
    """Prints ``FILE: OK`` and a summary (exit 0), or every problem on stderr (exit 1)."""
    from cloud_offload.config import load_cloud_config
    from splitwise_device.config import check_config_command

    return check_config_command(config, load_cloud_config, out=print, err=lambda line: print(line, file=sys.stderr))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config)
    print("splitwise-cloud: no worker service in this build yet; see `splitwise-cloud --help`.")
    return 2


if __name__ == "__main__":
    sys.exit(main())
