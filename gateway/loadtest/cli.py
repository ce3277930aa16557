"""``worker-gateway loadtest``: its flags, and ``main``, which maps the outcome to the exit status
(0 nothing lost and no turn failed, 1 otherwise, 2 for a usage or setup error, 130 interrupted)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.client.spawn import SpawnedGateway
from gateway.loadtest.progress import Progress
from gateway.loadtest.report import print_report, write_plot
from gateway.loadtest.run import run_load
from gateway.loadtest.target import SetupError, resolve_target, spawn_gateway


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="worker-gateway loadtest",
        description="Drive a gateway with sessions of the built-in 'load' agent and report whether any event "
        "was lost.  Exit 0 only when nothing was lost and no turn failed.",
    )
    target = p.add_argument_group("target (one of)")
    target.add_argument("--url", help="gateway URL, e.g. http://127.0.0.1:8765 or ws://127.0.0.1:8765/ws")
    target.add_argument(
        "--token",
        default=os.environ.get("WORKER_GATEWAY_TOKEN"),
        help="auth token for --url (default: $WORKER_GATEWAY_TOKEN)",
    )
    target.add_argument(
        "--spawn",
        action="store_true",
        help="start a private gateway (python -m gateway serve --port 0) and stop it at the end",
    )
    target.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the spawned gateway (repeatable), e.g. --gateway-arg=--agent=echo "
        "or --gateway-arg --backend --gateway-arg ray",
    )
    target.add_argument(
        "--spawn-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for the spawned gateway's ready line (default 30)",
    )

    load = p.add_argument_group("load")
    load.add_argument("--sessions", type=_positive_int, default=4, help="sessions, one connection each (default 4)")
    load.add_argument(
        "--turns",
        type=_non_negative_int,
        default=None,
        help="turns per session (default 2, or unlimited with --duration; 0 = unlimited, needs --duration)",
    )
    load.add_argument(
        "--duration", type=_positive_float, default=None, metavar="S", help="stop starting new turns after S seconds"
    )
    load.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        help="turns running at once across all sessions (default: --sessions)",
    )
    load.add_argument("--cpu-s", type=_non_negative_float, default=1.0, help="CPU seconds per turn (default 1)")
    load.add_argument(
        "--gil", choices=("python", "regex"), default="python", help="how the CPU work holds the GIL (default python)"
    )
    load.add_argument(
        "--output-mb", type=_non_negative_float, default=1.0, help="MB of tool output per turn (default 1)"
    )
    load.add_argument(
        "--chunk-kb", type=_chunk_kb, default=None, metavar="1..64", help="size of each output chunk (agent default 64)"
    )
    load.add_argument("--subagents", type=_non_negative_int, default=0, help="nested subagents per turn (default 0)")
    load.add_argument(
        "--turn-timeout",
        type=_positive_float,
        default=300.0,
        metavar="S",
        help="a turn not complete after S seconds counts as failed (default 300)",
    )

    probe = p.add_argument_group("measurement and chaos")
    probe.add_argument(
        "--ping-interval",
        type=_positive_float,
        default=0.1,
        metavar="S",
        help="seconds between app-level gateway.ping requests on a separate connection (default 0.1)",
    )
    probe.add_argument(
        "--sample-interval",
        type=_positive_float,
        default=0.5,
        metavar="S",
        help="seconds between /healthz samples (default 0.5)",
    )
    probe.add_argument(
        "--chaos",
        action="store_true",
        help="abort random session connections mid-turn (the client must reconnect and resume)",
    )
    probe.add_argument(
        "--chaos-interval",
        type=_positive_float,
        default=0.5,
        metavar="S",
        help="mean seconds between chaos drops (default 0.5)",
    )
    probe.add_argument("--seed", type=int, default=None, help="random seed for chaos and backoff jitter")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    out.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw ping latency and throughput over time (needs matplotlib: pip install 'worker-gateway[plot]')",
    )
    out.add_argument("--no-progress", action="store_true", help="no live progress display")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _chunk_kb(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be 1..64, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def join_gateway_args(argv: Sequence[str]) -> list[str]:
    """``--gateway-arg --flag`` becomes ``--gateway-arg=--flag``: argparse would take a value that starts
    with ``-`` for an option of its own, and gateway flags always do."""
    out: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--gateway-arg":
            value = next(items, None)
            out.append(item if value is None else f"--gateway-arg={value}")
        else:
            out.append(item)
    return out


def main(argv: list[str]) -> int:
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(join_gateway_args(argv))
    # Off a terminal (CI logs, pipes) rich would wrap the table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    err = Console(stderr=True, soft_wrap=True)  # an error line is copied and grepped: never wrapped
    if bool(args.url) == bool(args.spawn):
        parser.error("give exactly one of --url URL or --spawn")
    if args.turns == 0 and not args.duration:
        parser.error("--turns 0 (unlimited) needs --duration S")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            err.print(
                "worker-gateway loadtest: --plot needs matplotlib, which is not installed; install it with "
                "pip install 'worker-gateway[plot]' (or drop --plot)",
                markup=False,
                highlight=False,
            )
            return 2
    spawned: SpawnedGateway | None = None
    try:
        if args.spawn:
            spawned, target = spawn_gateway(args.gateway_arg, args.spawn_timeout)
        else:
            target = resolve_target(args.url, args.token)
        progress = Progress(console, enabled=not args.no_progress)
        report = asyncio.run(run_load(args, target, progress))
    except SetupError as exc:
        err.print(f"worker-gateway loadtest: {exc}", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("worker-gateway loadtest: interrupted", markup=False, highlight=False)
        return 130
    finally:
        if spawned is not None:
            code = spawned.stop()
            if code not in (0, None):
                err.print(
                    f"worker-gateway loadtest: the spawned gateway exited with status {code}\n{spawned.stderr_tail()}",
                    markup=False,
                    highlight=False,
                )
    if spawned is not None:
        report["gateway"]["exit_code"] = spawned.exit_code
    print_report(report, console)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        write_plot(report, args.plot)
        console.print(f"plot written to {args.plot}", markup=False, highlight=False)
    return 0 if report["ok"] else 1
