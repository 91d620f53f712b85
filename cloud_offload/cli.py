"""Command line of the cloud worker: ``splitwise-cloud <command>``."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from splitwise_core import __version__
from splitwise_core.errors import SplitwiseError
from splitwise_core.shutdown import StopRequest


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
    serve = commands.add_parser("serve", help="serve segments from the pool's shared subscription until SIGTERM")
    serve.add_argument("--config", help="worker config file (TOML); or give --broker and --model")
    serve.add_argument("--broker", help="broker URL, e.g. mqtt://127.0.0.1:1883")
    serve.add_argument("--model", help="GGUF model file or shard directory (the same model as the devices')")
    serve.add_argument("--worker-id", default=None, help="unique worker id (default: random)")
    serve.add_argument("--pool", default="default", help="pool name shared with the devices (default 'default')")
    serve.add_argument("--threads", type=int, default=1, help="compute threads (default 1)")
    serve.add_argument(
        "--profile",
        default=None,
        metavar="{measure,off,PATH}",
        help="cost profile to publish: measure it in the background after start, publish a profile JSON file, "
        "or none (default: the config's worker.profile, else measure)",
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return parser


def _check_config(config: str) -> int:
    """Prints ``FILE: OK`` and a summary (exit 0), or every problem on stderr (exit 1)."""
    from cloud_offload.config import load_cloud_config
    from splitwise_core.config import check_config_command

    return check_config_command(config, load_cloud_config, out=print, err=lambda line: print(line, file=sys.stderr))


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cloud_offload.mqtt import BrokerSettings, settings_from_config
    from cloud_offload.worker import CloudWorker
    from splitwise_core import systemd
    from splitwise_core.profile import profile_file_problems

    if args.config:
        from cloud_offload.config import ConfigError, load_cloud_config

        cfg = load_cloud_config(args.config)
        if args.profile is not None:  # the command line wins over the file
            cfg = cfg.model_copy(
                update={"worker": cfg.worker.model_copy(update={"profile": _profile_arg(args.profile)})}
            )
        problems = cfg.profile_problems()
        if problems:
            lines = [f"{args.config}: {p}" for p in problems]
            raise ConfigError("\n".join(lines), lines)
        w = cfg.worker
        logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        worker = CloudWorker(
            w.model,
            worker_id=w.id,
            pool=w.pool,
            broker=settings_from_config(cfg.broker),
            threads=w.threads or 1,
            session_ttl_s=w.session_ttl_s,
            kv_memory_cap=w.kv_memory_cap,
            max_sessions=w.max_sessions,
            profile=w.profile,
            max_rows_per_frame=w.max_rows_per_frame,
            max_frames_per_s_per_device=w.max_frames_per_s_per_device,
            frame_burst_per_device=w.frame_burst_per_device,
            max_queued_bytes=w.max_queued_bytes,
        )
    else:
        if not args.broker or not args.model:
            parser.error("serve needs --config, or both --broker and --model")
        if not Path(args.model).exists():
            parser.error(f"--model {args.model}: no such file or directory")
        profile = _profile_arg(args.profile or "measure")
        if isinstance(profile, Path):
            problems = profile_file_problems(profile)
            if problems:
                parser.error(f"--profile {args.profile}: {problems[0]}")
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        worker = CloudWorker(
            args.model,
            worker_id=args.worker_id or f"w-{uuid.uuid4().hex[:8]}",
            pool=args.pool,
            broker=BrokerSettings.from_url(args.broker),
            threads=args.threads,
            profile=profile,
        )
    stop = StopRequest()
    # READY=1 only once the broker has connected: until then the unit is "activating", as
    # deploy/README.md promises; the MQTT layer logs why it cannot connect.
    connected = threading.Event()
    worker.connection.add_on_connect(connected.set)
    worker.start(connect_timeout=None)
    period = (systemd.watchdog_interval() or 10.0) / 2
    ready_sent = False
    while not stop.is_set():
        if not ready_sent and connected.is_set():
            systemd.ready()
            ready_sent = True
            logging.getLogger(__name__).info("worker %s serving pool %s", worker.worker_id, worker.pool)
        systemd.watchdog_ping()
        stop.wait(period if ready_sent else 0.2)
    systemd.stopping()
    worker.stop()
    return 0


def _profile_arg(value: str) -> str | Path:
    """``measure`` and ``off`` as they are; anything else is a profile file (relative to the cwd)."""
    return value if value in ("measure", "off") else Path(value).absolute()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "serve":
        try:
            return _serve(args, parser)
        except SplitwiseError as err:
            print(f"splitwise-cloud: error: {err}", file=sys.stderr)
            return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
