"""The pieces of docs/BENCHMARKS.md: sections with tables, goals, and the description of the machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Awaitable, Callable, Sequence

PACKAGES = ("worker-gateway", "uvicorn", "starlette", "websockets", "uvloop", "httptools", "multiprocess",
            "psutil", "prometheus-client")


@dataclass(frozen=True)
class Options:
    quick: bool = False
    rounds: int | None = None  # override of each benchmark's default number of rounds

    def pick(self, full: int, quick: int) -> int:
        if self.rounds is not None:
            return self.rounds
        return quick if self.quick else full


@dataclass
class Goal:
    name: str
    target: str
    measured: str
    met: bool | None  # None: not measurable in this run
    note: str = ""


@dataclass
class Section:
    key: str
    title: str
    command: str
    body: str
    goals: list[Goal] = field(default_factory=list)
    seconds: float = 0.0


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float, digits: int = 1) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    value = seconds * 1000.0
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def num(value: float, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:,.{digits}f}"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_availability(seconds: float = 0.5) -> float:
    """Share of one core this process actually got while spinning for ``seconds`` of wall time.  On an idle
    machine it is ~1.0; well below that, other processes competed for the CPU during the run."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    x = 0
    while time.perf_counter() - wall0 < seconds:
        for i in range(10000):
            x += i
    return (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def machine_table(load_before: tuple[float, float, float], avail_before: float,
                  load_after: tuple[float, float, float], avail_after: float) -> str:
    try:
        import psutil

        memory = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
        cores = f"{psutil.cpu_count(logical=False) or '?'} physical / {os.cpu_count()} logical"
    except Exception:  # noqa: BLE001
        memory, cores = "?", str(os.cpu_count())
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    rows = [
        ("CPU", cpu_model()),
        ("cores", cores),
        ("memory", memory),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"),
        ("packages", ", ".join(versions)),
        ("event loop", _loop_name()),
        ("load average at start / end", f"{_fmt_load(load_before)} / {_fmt_load(load_after)}"),
        ("CPU share one spinning process got, at start / end", f"{avail_before:.0%} / {avail_after:.0%}"),
    ]
    return table(("", ""), rows)


def _fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401

        return "uvloop (uvicorn's auto choice; httptools for HTTP), in the gateway and the baselines alike"
    except ImportError:
        return "asyncio (uvloop not installed)"


def run_alone(prog: str, doc: str, run: Callable[[Options], Awaitable[Section]], argv: list[str] | None,
              quick_help: str) -> int:
    """``python -m bench.<name> [--quick] [--json]``: one benchmark's section printed (or as JSON), with its
    goals' verdicts, without rewriting docs/BENCHMARKS.md."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print the section as JSON")
    args = parser.parse_args(argv)
    section = asyncio.run(run(Options(quick=args.quick)))  # type: ignore[arg-type]
    if args.json:
        as_json: dict[str, Any] = {"key": section.key, "body": section.body,
                                   "goals": [g.__dict__ for g in section.goals]}
        print(json.dumps(as_json, indent=2))
    else:
        print(section.body)
        for goal in section.goals:
            print(f"- {goal.name}: {goal.measured} (target {goal.target}) {'met' if goal.met else 'NOT met'}")
    return 0
