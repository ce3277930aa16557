"""``python -m bench``: run every benchmark and rewrite docs/BENCHMARKS.md (``make bench``).

Options: ``--quick`` (shorter windows, fewer rounds: a smoke run in about two minutes), ``--only
stall,relay,start,teardown,scale,store_gateway,store,encode,workers`` (prints the sections instead of rewriting the document, unless
``--out`` is given), ``--rounds N`` (override every benchmark's rounds), ``--out PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import (bench_encode, bench_relay, bench_scale, bench_stall, bench_start, bench_store,
                   bench_ray, bench_store_gateway, bench_teardown)
from bench.procs import ROOT
from bench.report import Goal, Options, Section, cpu_availability, machine_table, table

BENCHMARKS = {
    "stall": bench_stall,
    "relay": bench_relay,
    "start": bench_start,
    "teardown": bench_teardown,
    "scale": bench_scale,
    "store_gateway": bench_store_gateway,
    "store": bench_store,
    "encode": bench_encode,
    "ray": bench_ray,
}
WORKERS_SCRIPT = ROOT / "bench" / "bench_workers.py"
DEFAULT_OUT = ROOT / "docs" / "BENCHMARKS.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows and fewer rounds (a smoke run)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join([*BENCHMARKS, 'workers'])}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for every benchmark (default: each its own)")
    parser.add_argument("--out", default=None, help=f"where to write the report (default {DEFAULT_OUT.relative_to(ROOT)}; "
                                                    "with --only: standard output)")
    args = parser.parse_args(argv)
    wanted = [k.strip() for k in args.only.split(",") if k.strip()] or [*BENCHMARKS, "workers"]
    unknown = [k for k in wanted if k not in BENCHMARKS and k != "workers"]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join([*BENCHMARKS, 'workers'])}")
    opts = Options(quick=args.quick, rounds=args.rounds)

    os.chdir(ROOT)
    commit = measured_commit()  # before the run: what was measured, whatever happens to the tree meanwhile
    load_before, avail_before = os.getloadavg(), cpu_availability()
    began = time.perf_counter()
    sections: list[Section] = []
    failed = False
    for key in wanted:
        print(f"== {key}", flush=True)
        try:
            if key == "workers":
                section = run_workers_script(opts)
            else:
                section = asyncio.run(BENCHMARKS[key].run(opts))
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not lose the others' numbers
            failed = True
            traceback.print_exc()
            section = Section(key, f"{key}: FAILED", f".venv/bin/python -m bench --only {key}",
                              f"This benchmark failed in this run: `{type(exc).__name__}: {exc}`.")
        sections.append(section)
        print(f"   {key} took {section.seconds:.0f} s", flush=True)
    elapsed = time.perf_counter() - began
    load_after, avail_after = os.getloadavg(), cpu_availability()

    document = render(sections, opts, elapsed, machine_table(load_before, avail_before, load_after, avail_after),
                      partial=bool(args.only), commit=commit)
    out = args.out if args.out is not None else (None if args.only else str(DEFAULT_OUT))
    if out in (None, "-"):
        print(document)
    else:
        Path(out).write_text(document)
        print(f"wrote {out} ({elapsed / 60:.1f} min)")
    return 1 if failed else 0


def run_workers_script(opts: Options) -> Section:
    """bench/bench_workers.py (the worker layer's own benchmark) in a subprocess, its JSON as a table."""
    started = time.perf_counter()
    command = [sys.executable, "bench/bench_workers.py", "--json"]
    if opts.quick or opts.rounds:
        command += ["--rounds", str(opts.rounds or 20)]
    shown = ".venv/bin/python bench/bench_workers.py" + (" --rounds 20" if opts.quick else "")
    if not WORKERS_SCRIPT.exists():
        return Section("workers", "9. Worker layer", shown, "`bench/bench_workers.py` is not there in this checkout.")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"bench/bench_workers.py exited {done.returncode}: {done.stderr.strip()[-500:]}")
    try:
        data: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return Section("workers", "9. Worker layer", shown, "```\n" + done.stdout.strip() + "\n```", seconds=seconds)
    return Section("workers", "9. Worker layer (bench/bench_workers.py)", shown, _workers_body(data), seconds=seconds)


def _workers_body(data: dict[str, Any]) -> str:
    labels = {
        "warm_hand_out": "warm hand-out: `Supervisor.acquire` from a ready pool",
        "cold_supervisor_fork": "cold: `Supervisor` with `pool_size=0` (fork from the forkserver)",
        "cold_popen_python": "cold: a new `python` process importing the worker code",
    }
    rows = []
    for key, label in labels.items():
        r = data.get(key)
        if isinstance(r, dict):
            rows.append((label, r.get("n", "–"), r.get("p50_ms", "–"), r.get("p99_ms", "–")))
    parts = ["In-process measurements of the worker layer, without the gateway or a WebSocket in the way.",
             table(("worker start", "samples", "p50 (ms)", "p99 (ms)"), rows)]
    other = []
    mem = data.get("idle_memory") or {}
    if "worker_uss_mib" in mem:
        other.append(("USS of an idle pooled worker", f"{mem['worker_uss_mib']} MiB"))
    if "watchdog_uss_mib" in mem:
        other.append(("USS of its session keeper (or watchdog) process", f"{mem['watchdog_uss_mib']} MiB"))
    scrub = data.get("scrub") or {}
    for key, value in scrub.items():
        if key.endswith("_mb_per_s"):
            other.append((f"scrub throughput, {key[:-len('_mb_per_s')].replace('_', ' ')} text", f"{value} MB/s"))
    if other:
        parts.append(table(("", "value"), other))
    return "\n\n".join(parts)


def render(sections: list[Section], opts: Options, elapsed: float, machine: str, partial: bool,
           commit: str = "") -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "`--quick` (short windows, one round: a smoke run, not the reference numbers)" if opts.quick else "full"
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`.venv/bin/python -m bench`; `--quick` for a short smoke run) — do not "
        "edit by hand: the next run rewrites this file.  Every table says how to reproduce it alone "
        "(`--only <name>` prints that section instead of rewriting this file).",
        "",
        f"This run: {now}, {mode}, {elapsed / 60:.1f} minutes{' (partial: --only)' if partial else ''}, "
        f"of commit {commit or measured_commit()}.  Everything "
        "runs on 127.0.0.1; the servers under test are subprocesses started exactly as users start them, "
        "the client is one Python process using `websockets` (what users run) or, where a row says *raw*, a "
        "byte-counting client that reads only frame headers (`bench/rawclient.py`).  Every gateway runs with "
        "the session store on (the default for users; here each in a fresh temporary `--state-dir`) unless "
        "its row says `--no-state`.",
        "",
        "## Machine",
        "",
        machine,
        "",
        "A loaded machine (other processes competing for the cores, see the last two rows) moves the latency "
        "and throughput figures; the ratios are measured within one run, sides alternating, to cancel most "
        "of that.",
        "",
    ]
    goals = [g for s in sections for g in s.goals]
    if goals:
        lines += ["## Goals vs measured", "", _goal_table(goals), ""]
    for s in sections:
        lines += [f"## {s.title}", "", f"Reproduce: `{s.command}`" + (" (add `--quick` for a shorter run)"
                                                                       if s.command.startswith(".venv/bin/python -m bench") else ""),
                  "", s.body, ""]
        if s.seconds:
            lines += [f"*({s.seconds:.0f} s)*", ""]
    return "\n".join(lines)


def measured_commit() -> str:
    """The checkout's commit (short hash and subject), marked when the work tree had changes."""
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if not head:
        return "unknown (not a git checkout)"
    hash_, _, subject = head.partition(" ")
    subject = subject.replace("`", "'")
    subject = subject if len(subject) <= 80 else subject[:77] + "..."
    return f"`{hash_}` ({subject}){' with uncommitted changes' if dirty else ''}"


def _goal_table(goals: list[Goal]) -> str:
    mark = {True: "met", False: "**not met**", None: "–"}
    return table(("goal", "target", "measured", "verdict", "why (when short)"),
                 [(g.name, g.target, g.measured, mark[g.met], g.note or "") for g in goals])


if __name__ == "__main__":
    sys.exit(main())
