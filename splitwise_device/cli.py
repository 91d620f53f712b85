"""Command line of the edge agent: ``splitwise-device <command>``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from splitwise_device import __version__, codecs
from splitwise_device.errors import SplitwiseError


def _codec_demo(args: argparse.Namespace) -> int:
    """Round-trips one activation vector through every codec and prints what it costs."""
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal(args.size).astype(np.float32)
    print(f"activation: {args.size} float32 values ({x.nbytes} bytes), seed {args.seed}")
    print(f"{'codec':<6} {'bytes':>8} {'ratio':>6} {'max abs err':>12} {'rel rms err':>12} {'crc32c':>10} {'µs':>8}")
    for codec in codecs.CODECS:
        start = time.perf_counter()
        encoded = codecs.encode(x, codec)
        y = codecs.decode(encoded, codec, x.shape)
        micros = (time.perf_counter() - start) * 1e6
        err = y - x
        rel_rms = float(np.sqrt(np.mean(err**2) / np.mean(x**2)))
        print(
            f"{codec:<6} {len(encoded):>8} {x.nbytes / len(encoded):>6.2f} {float(np.abs(err).max()):>12.3e} "
            f"{rel_rms:>12.3e} {codecs.crc32c(encoded):>10x} {micros:>8.1f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitwise-device",
        description="Splitwise edge agent: runs an LLM split per layer, head and FFN part between "
        "this device and cloud workers, serving requests over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "codec-demo",
        help="round-trip a random activation through every codec and print size and error",
    )
    demo.add_argument("--size", type=_positive_int, default=576, help="values in the activation (default 576)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(handler=_codec_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code: int = args.handler(args)
    except SplitwiseError as err:
        print(f"splitwise-device: error: {err}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
