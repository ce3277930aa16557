"""The load test's verdict and its presentations: the report dict (the ``--json`` file), the table on the
console and the ``--plot`` figure."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from gateway.loadtest.stats import histogram_delta, histogram_quantile, parse_histogram, percentile

if TYPE_CHECKING:
    from gateway.loadtest.run import RunState


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def build_report(state: RunState, metrics_before: str | None, metrics_after: str | None) -> dict[str, Any]:
    args = state.args
    sessions = state.sessions
    latencies = [lat for s in sessions for lat in s.latencies]
    ping_ms = [ms for _, ms in state.pings]
    load_s = ((state.load_ended or time.monotonic()) - (state.load_started or state.started)) or 1e-9
    wire_bytes = state.bytes_received()
    lag = histogram_delta(
        parse_histogram(metrics_before or "", "wg_loop_lag_seconds"),
        parse_histogram(metrics_after or "", "wg_loop_lag_seconds"),
    )
    lag_p50, lag_p99 = histogram_quantile(lag, 0.5), histogram_quantile(lag, 0.99)
    health_lag = [float(h["loop_lag_ms"]) for h in state.health if isinstance(h.get("loop_lag_ms"), (int, float))]
    health_workers = [int(h["workers"]) for h in state.health if isinstance(h.get("workers"), int)]
    drops = sum(c.stats.drops for c in state.clients)
    forced = sum(c.stats.forced_drops for c in state.clients)
    failed = sum(s.turns_failed for s in sessions)
    lost = sum(s.lost for s in sessions)
    # Losses can only be ruled out for a session whose stream reached session.closed (its last seq).
    unverified = sum(1 for s in sessions if s.final_seq is None)
    report: dict[str, Any] = {
        "ok": lost == 0 and failed == 0 and unverified == 0,
        "config": {k: v for k, v in vars(args).items() if k not in ("token",)},
        "prompt": state.prompt,
        "gateway": {
            "url": state.target.http_url,
            "spawned": state.target.pid is not None,
            "version": state.gateway_info.get("version"),
            "limits": state.gateway_info.get("limits"),
        },
        "duration_s": _r(load_s),
        "turns": {"completed": sum(s.turns_ok for s in sessions), "failed": failed},
        "connections": {
            "dropped_by_server": drops - forced,
            "dropped_by_chaos": forced,
            "reconnects": sum(max(0, c.stats.connects - 1) for c in state.clients),
            "resumes": sum(c.stats.resumes for c in state.clients),
            "replayed_events": sum(c.stats.replayed for c in state.clients),
        },
        "events": {
            "received": sum(s.events for s in sessions),
            "lost": lost,
            "sessions_unverified": unverified,
            "duplicates": sum(s.duplicates for s in sessions),
            "out_of_order": sum(s.out_of_order for s in sessions),
            "replay_overlap_filtered": sum(c.stats.duplicates for c in state.clients),
            "truncated": sum(c.stats.truncations for c in state.clients),
        },
        "turn_latency_s": {
            "p50": _r(percentile(latencies, 50)),
            "p95": _r(percentile(latencies, 95)),
            "p99": _r(percentile(latencies, 99)),
            "max": _r(max(latencies, default=None)),
        },
        "ping_ms": {
            "count": len(ping_ms),
            "failed": state.ping_failures,
            "p50": _r(percentile(ping_ms, 50)),
            "p99": _r(percentile(ping_ms, 99)),
            "max": _r(max(ping_ms, default=None)),
        },
        "throughput": {
            "wire_bytes": wire_bytes,
            "mb_per_s": _r(wire_bytes / 1e6 / load_s),
            "tool_output_bytes": sum(s.output_bytes for s in sessions),
        },
        "loop_lag_ms": {
            "samples": int(lag["count"]) if lag else 0,
            "p50_le": _r(None if lag_p50 is None else lag_p50 * 1000.0),
            "p99_le": _r(None if lag_p99 is None or math.isinf(lag_p99) else lag_p99 * 1000.0),
            "mean": _r(lag["sum"] / lag["count"] * 1000.0) if lag and lag["count"] else None,
            "healthz_max": _r(max(health_lag, default=None)),
        },
        "workers": {"peak_healthz": max(health_workers, default=None), "peak_processes": state.process_peak},
        "sessions": [
            {
                "index": s.index,
                "session_id": s.session_id,
                "turns_ok": s.turns_ok,
                "turns_failed": s.turns_failed,
                "events": s.events,
                "last_seq": s.last_seq,
                "final_seq_seen": s.final_seq is not None,
                "lost": s.lost,
                "reported_truncated": s.truncated_missing,
                "duplicates": s.duplicates,
                "errors": s.errors[:20],
            }
            for s in sessions
        ],
        "errors": state.errors[:50],
        "timeseries": {
            "ping_ms": [[_r(t), _r(ms)] for t, ms in state.pings],
            "throughput_mb_s": [[_r(t), _r(v)] for t, v in state.throughput],
            "workers": [[_r(h["t"]), h.get("workers")] for h in state.health],
        },
    }
    if lag_p99 is not None and math.isinf(lag_p99):
        report["loop_lag_ms"]["p99_le"] = "inf"
    return report


def fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    t, c, e = report["turns"], report["connections"], report["events"]
    lat, ping, lag, w = report["turn_latency_s"], report["ping_ms"], report["loop_lag_ms"], report["workers"]
    return [
        ("turns completed / failed", f"{t['completed']} / {t['failed']}"),
        ("connections dropped by server", str(c["dropped_by_server"])),
        (
            "connections dropped by chaos",
            f"{c['dropped_by_chaos']} ({c['resumes']} resumes, {c['replayed_events']} events replayed)",
        ),
        ("events received", str(e["received"])),
        (
            "events lost (seq gaps)",
            str(e["lost"])
            + (
                f" ({e['sessions_unverified']} sessions not verifiable: no session.closed seen)"
                if e["sessions_unverified"]
                else ""
            ),
        ),
        ("duplicates", f"{e['duplicates']} (replay overlap filtered by client: {e['replay_overlap_filtered']})"),
        (
            "turn latency p50 / p95 / p99",
            f"{fmt(lat['p50'], ' s', 2)} / {fmt(lat['p95'], ' s', 2)} / {fmt(lat['p99'], ' s', 2)}",
        ),
        (
            "app ping p50 / p99 / max",
            f"{fmt(ping['p50'], ' ms')} / {fmt(ping['p99'], ' ms')} / {fmt(ping['max'], ' ms')}"
            f" ({ping['count']} pings, {ping['failed']} failed)",
        ),
        (
            "throughput",
            f"{fmt(report['throughput']['mb_per_s'], ' MB/s', 2)}"
            f" ({report['throughput']['wire_bytes'] / 1e6:.1f} MB in {report['duration_s']:.1f} s)",
        ),
        (
            "gateway loop lag (/metrics)",
            f"p50 <= {fmt(lag['p50_le'], ' ms')}, p99 <= {fmt(lag['p99_le'], ' ms')}, "
            f"mean {fmt(lag['mean'], ' ms', 2)} ({lag['samples']} samples)",
        ),
        ("gateway loop lag max (/healthz)", fmt(lag["healthz_max"], " ms")),
        ("peak worker processes", f"{fmt(w['peak_healthz'])} (healthz), {fmt(w['peak_processes'])} (processes)"),
        ("result", "OK: nothing lost, no turn failed" if report["ok"] else "FAILED: see the rows above"),
    ]


def print_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"worker-gateway loadtest: {report['prompt']}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value")
    for name, value in report_rows(report):
        style = None
        if name == "result":
            style = "bold green" if report["ok"] else "bold red"
        elif name.startswith("events lost") and report["events"]["lost"]:
            style = "bold red"
        table.add_row(name, value, style=style)
    console.print(table)
    failed = [s for s in report["sessions"] if s["errors"]]
    for s in failed[:10]:
        console.print(
            f"session {s['index']} ({s['session_id']}): " + "; ".join(s["errors"][:5]),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    for error in report["errors"][:10]:
        console.print(f"note: {error}", markup=False, highlight=False, soft_wrap=True)


def write_plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["timeseries"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    if series["ping_ms"]:
        xs, ys = zip(*series["ping_ms"], strict=False)
        top.plot(xs, ys, linewidth=0.8)
    top.set_ylabel("app ping (ms)")
    top.set_title(f"worker-gateway loadtest: {report['prompt']}")
    if series["throughput_mb_s"]:
        xs, ys = zip(*series["throughput_mb_s"], strict=False)
        bottom.plot(xs, ys, linewidth=0.8, color="tab:green")
    bottom.set_ylabel("received (MB/s)")
    bottom.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
