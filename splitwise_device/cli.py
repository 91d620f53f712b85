"""Command line of the edge agent: ``splitwise-device <command>``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitwise_core import __version__, codecs
from splitwise_core.errors import SplitwiseError

if TYPE_CHECKING:
    from splitwise_core.engine import Engine
    from splitwise_device.config import DeviceConfig


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


def _model_path(args: argparse.Namespace) -> Path:
    from splitwise_core.tokenizer import bundled_model_path

    return Path(args.model) if args.model else bundled_model_path()


def _engine(args: argparse.Namespace) -> Engine:
    from splitwise_core.engine import Engine

    return Engine(_model_path(args), threads=args.threads, memory_budget_bytes=args.memory_budget)


def _print_stats(engine: Engine) -> None:
    stats = engine.model.weight_stats()
    budget = stats["budget_bytes"]
    if budget is not None:
        print(
            f"[weights: budget {_mb(budget)}, peak mapped {_mb(stats['peak_mapped_bytes'] or 0)}, "
            f"{stats['loads']} loads, {stats['evictions']} evictions]",
            file=sys.stderr,
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _generate(args: argparse.Namespace) -> int:
    if args.plan and args.plan != "edge-only":
        return _generate_split(args)
    engine = _engine(args)
    result = engine.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.text)
        t = result.timings
        print(
            f"[{len(result.prompt_tokens)} prompt tokens, {len(result.tokens)} generated ({result.stop_reason}); "
            f"prefill {t['prefill_tokens_per_s']:.1f} tok/s, decode {t['decode_tokens_per_s']:.1f} tok/s]",
            file=sys.stderr,
        )
        _print_stats(engine)
    return 0


def _generate_split(args: argparse.Namespace) -> int:
    """One request through the split path: local sub-blocks here, the rest on the pool's workers."""
    import uuid

    from cloud_offload.mqtt import BrokerSettings, MqttConnection, RpcClient
    from cloud_offload.protocol import frames, topics
    from policies.plan import parse_plan
    from policies.segments import ModelDims, compile_plan
    from splitwise_core.engine import model_sha256
    from splitwise_device.executor import RecoveryPolicy, SplitExecutor

    engine = _engine(args)
    cfg = engine.config
    plan = parse_plan(args.plan, int(cfg["n_layer"]), int(cfg["n_head"]))
    if not args.broker:
        print("splitwise-device: error: --plan other than edge-only needs --broker URL", file=sys.stderr)
        return 2
    schedule = compile_plan(plan, ModelDims.from_config(cfg))
    connection = MqttConnection(BrokerSettings.from_url(args.broker), f"splitwise-cli-{uuid.uuid4().hex[:8]}")
    connection.start(timeout=10)
    try:
        rpc = RpcClient(connection, topics.device_reply_topic("cli", uuid.uuid4().hex[:12]))
        model_hash = frames.model_hash_prefix(model_sha256(engine.path))
        executor = SplitExecutor.over_mqtt(
            engine.model,
            engine.tokenizer.eos_id,
            rpc,
            pool=args.pool,
            model_hash=model_hash,
            codec=args.codec,
            policy=RecoveryPolicy(),
        )
        prompt = engine.prompt_tokens(args.prompt)
        result = executor.generate(prompt, schedule, args.max_tokens, temperature=args.temperature, seed=args.seed)
    finally:
        connection.stop()
    text = engine.tokenizer.decode(result.tokens)
    decode = [s.seconds for s in result.steps[1:]]
    summary = {
        "prompt_tokens": prompt,
        "tokens": result.tokens,
        "text": text,
        "stop_reason": result.stop_reason,
        "plan": plan.summary(),
        "codec": args.codec,
        "timings": {
            "prefill_s": result.steps[0].seconds if result.steps else 0.0,
            "decode_ms_per_token": 1000 * sum(decode) / len(decode) if decode else 0.0,
        },
        "transfer": {
            "requests": result.transfer.requests,
            "bytes_up": result.transfer.bytes_up,
            "bytes_down": result.transfer.bytes_down,
        },
        "recovery": [e.to_json() for e in result.events],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(text)
        t = summary["timings"]
        print(
            f"[plan {plan.name}: {result.transfer.requests} cloud requests; prefill {t['prefill_s']:.3f} s, "
            f"decode {t['decode_ms_per_token']:.1f} ms/token; {len(result.events)} recovery events]",
            file=sys.stderr,
        )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from splitwise_device.planning import run_plan_command

    return run_plan_command(args)


def _run(args: argparse.Namespace) -> int:
    from splitwise_device.agent import run_agent

    return run_agent(args.config)


def _demo(args: argparse.Namespace) -> int:
    from splitwise_device.demo import run_demo

    return run_demo(args)


def _perplexity(args: argparse.Namespace) -> int:
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        print(f"splitwise-device: error: cannot read --text {args.text}: {err}", file=sys.stderr)
        return 1
    engine = _engine(args)
    tokens = engine.tokenizer.encode(text)[: args.max_tokens]
    result = engine.perplexity(tokens)
    if args.json:
        print(
            json.dumps(
                {
                    "tokens": result.tokens,
                    "perplexity": result.perplexity,
                    "mean_nll": result.mean_nll,
                    "seconds": result.seconds,
                }
            )
        )
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.seconds:.2f} s)")
        _print_stats(engine)
    return 0


def _shard(args: argparse.Namespace) -> int:
    from splitwise_core.shards import shard_model

    def progress(shard: dict[str, Any]) -> None:
        what = "base (embedding, output, tokenizer)" if shard["role"] == "base" else f"layer {shard['layer']}"
        print(f"wrote {Path(shard['path']).name:<16} {_mb(shard['bytes']):>10}  {what}", flush=True)

    manifest = shard_model(args.model, args.outdir, force=args.force, progress=progress)
    total = sum(f["bytes"] for f in manifest["files"])
    print(
        f"{len(manifest['files'])} shards of {manifest['source_file']} ({manifest['n_layer']} layers, "
        f"{_mb(total)}) in {args.outdir}; source sha256 {manifest['source_sha256'][:16]}…"
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    """Prints ``FILE: OK`` and a summary (exit 0), or every problem on stderr (exit 1). With
    ``--connect``, then also connects to the broker and reports the outcome."""
    from splitwise_core.config import check_config_command
    from splitwise_device.config import load_device_config

    code = check_config_command(
        args.config, load_device_config, out=print, err=lambda line: print(line, file=sys.stderr)
    )
    if code != 0 or not args.connect:
        return code
    return _check_connect(args.config, load_device_config(args.config), args.connect_timeout)


def _check_connect(label: str, config: DeviceConfig, timeout: float) -> int:
    """One connection with the config's broker settings (under a client id of its own, so a running
    agent keeps its session); 0 on a CONNACK, else 1 with the reason."""
    import uuid

    from cloud_offload.mqtt import MqttConnection, settings_from_config

    where = f"{config.broker.host}:{config.broker.port}"
    try:
        settings = settings_from_config(config.broker)
        connection = MqttConnection(settings, f"{config.client_id}-check-{uuid.uuid4().hex[:6]}")
        try:
            connection.start(timeout)
        finally:
            connection.stop()
    except (SplitwiseError, OSError, ValueError) as err:
        print(f"{label}: broker: cannot connect to {where}: {err}", file=sys.stderr)
        return 1
    print(f"{label}: broker: connected to {where} (TLS {'on' if settings.tls else 'off'})")
    return 0


def _profile(args: argparse.Namespace) -> int:
    """Measures this machine (``splitwise_core.profiler``) and writes a ``splitwise_core.profile.Profile``."""
    from splitwise_core.profiler import Settings, measure, stderr_progress, to_profile

    model = _model_path(args)
    if not model.exists():
        print(f"splitwise-device: error: model not found: {model}", file=sys.stderr)
        return 1
    settings = Settings.quick() if args.quick else Settings.default()
    measurement = measure(model, args.threads, settings, progress=stderr_progress)
    profile = to_profile(measurement)
    profile.save(args.out)
    if args.raw:
        Path(args.raw).write_text(json.dumps(measurement.to_json(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({measurement.seconds_total:.1f} s of profiling)", file=sys.stderr)
    return 0


def _add_model_args(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--model",
        help="GGUF model file, first file of a gguf-split set, or shard directory "
        "(default: the bundled SmolLM2-135M-Instruct Q4_1)",
    )
    command.add_argument(
        "--memory-budget",
        type=_size,
        default=None,
        metavar="SIZE",
        help="cap on mapped weight files, e.g. 256MB or 1GiB (needs a shard directory to go below the model size)",
    )
    command.add_argument("--threads", type=_positive_int, default=1, help="compute threads (default 1)")
    command.add_argument("--json", action="store_true", help="print one JSON object")


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

    generate = commands.add_parser("generate", help="generate text on this device")
    generate.add_argument("--prompt", required=True, help="prompt text")
    generate.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens to generate (default 64)")
    generate.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    generate.add_argument(
        "--plan", default=None, help="edge-only (default), cloud-only, layer-split:K, heads:N or a plan file"
    )
    generate.add_argument("--broker", default=None, help="broker URL for split plans, e.g. mqtt://127.0.0.1:1883")
    generate.add_argument(
        "--codec",
        choices=["f32", "f16", "q8_0", "q4_0"],
        default="q8_0",
        help="activation codec on the wire (default q8_0)",
    )
    generate.add_argument("--pool", default="default", help="cloud worker pool (default 'default')")
    _add_model_args(generate)
    generate.set_defaults(handler=_generate)

    plan_cmd = commands.add_parser(
        "plan", help="what a planner chooses for a link and backlog, with the predicted costs"
    )
    plan_cmd.add_argument("--profile", required=True, help="edge profile (JSON, splitwise_core.profile.Profile)")
    plan_cmd.add_argument("--cloud-profile", required=True, help="cloud worker profile (JSON)")
    plan_cmd.add_argument("--bandwidth", required=True, help="e.g. 10mbit, 100Mbps, 1.5MB/s, 0 (cut)")
    plan_cmd.add_argument("--rtt", required=True, help="round-trip time, e.g. 20ms")
    plan_cmd.add_argument("--backlog-s", type=float, default=0.0, help="seconds of queued work on the device")
    plan_cmd.add_argument("--cloud-load", type=float, default=1.0, help="cloud slowdown factor (1 = profiled)")
    plan_cmd.add_argument(
        "--planner", default="splitwise-dp", help="planner to run (default splitwise-dp; --all lists and runs them all)"
    )
    plan_cmd.add_argument("--all", action="store_true", help="compare every planner side by side")
    plan_cmd.add_argument("--codec", choices=["f32", "f16", "q8_0", "q4_0"], default="q8_0")
    plan_cmd.add_argument("--prompt-len", type=_positive_int, default=64)
    plan_cmd.add_argument("--max-tokens", type=_positive_int, default=64)
    plan_cmd.add_argument("--min-edge-layers", type=int, default=0, help="privacy: first N layers stay on the device")
    plan_cmd.add_argument("--model", default=None, help="model whose shape is planned (default: bundled SmolLM2)")
    plan_cmd.add_argument("--json", action="store_true", help="print JSON")
    plan_cmd.set_defaults(handler=_plan)

    run = commands.add_parser("run", help="run the edge agent (the systemd service) until SIGTERM")
    run.add_argument("--config", required=True, help="device config file (TOML)")
    run.set_defaults(handler=_run)

    demo_cmd = commands.add_parser(
        "demo", help="start a local broker, a cloud worker and the agent; ask one prompt over MQTT; stop them"
    )
    demo_cmd.add_argument("--prompt", default="What is MQTT? Answer in one sentence.", help="prompt to ask")
    demo_cmd.add_argument("--plan", default="layer-split:15", help="partition plan (default layer-split:15)")
    demo_cmd.add_argument("--codec", choices=["f32", "f16", "q8_0", "q4_0"], default="q8_0")
    demo_cmd.add_argument("--max-tokens", type=_positive_int, default=48)
    demo_cmd.add_argument("--broker", default=None, help="use this broker instead of starting mosquitto")
    demo_cmd.add_argument("--model", default=None, help="model (default: the bundled SmolLM2)")
    demo_cmd.set_defaults(handler=_demo)

    perplexity = commands.add_parser("perplexity", help="perplexity of the model on a text file")
    perplexity.add_argument("--text", required=True, help="UTF-8 text file")
    perplexity.add_argument("--max-tokens", type=_positive_int, default=512, help="score the first N tokens")
    _add_model_args(perplexity)
    perplexity.set_defaults(handler=_perplexity)

    shard = commands.add_parser(
        "shard",
        help="split a GGUF model into role shards: base.gguf (embedding, output, tokenizer) and one file per layer",
    )
    shard.add_argument("model", metavar="MODEL.gguf", help="GGUF model file or first file of a gguf-split set")
    shard.add_argument("outdir", metavar="OUTDIR", help="directory for the shards (created if missing; must be empty)")
    shard.add_argument("--force", action="store_true", help="replace the shards already in OUTDIR")
    shard.set_defaults(handler=_shard)

    check_config = commands.add_parser(
        "check-config", help="validate a device.toml and the files it names (model, TLS, password)"
    )
    check_config.add_argument("--config", required=True, help="device config file (TOML)")
    check_config.add_argument(
        "--connect", action="store_true", help="also connect to the broker and report success or the reason"
    )
    check_config.add_argument(
        "--connect-timeout", type=float, default=10.0, metavar="S", help="seconds to wait for the broker (default 10)"
    )
    check_config.set_defaults(handler=_check_config)
    profile = commands.add_parser("profile", help="measure sub-block, codec and prefill costs on this machine")
    profile.add_argument("--model", help="GGUF model file or shard directory (default: the bundled SmolLM2)")
    profile.add_argument("--threads", type=_positive_int, default=1, help="compute threads (default 1)")
    profile.add_argument("--out", default="profile.json", help="profile file to write (default profile.json)")
    profile.add_argument("--raw", default=None, metavar="FILE", help="also write every raw measurement as JSON")
    profile.add_argument("--quick", action="store_true", help="fewer points and repetitions (about 10 s)")
    profile.set_defaults(handler=_profile)
    return parser


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 10.0:
        raise argparse.ArgumentTypeError(f"temperature must lie in [0, 10], got {value}")
    return value


def _size(text: str) -> int:
    from splitwise_core.shards import parse_size

    try:
        return parse_size(text)
    except SplitwiseError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
