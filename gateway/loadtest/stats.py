"""The load test's numbers: nearest-rank percentiles and Prometheus histograms read from exposition text.

Pure functions, no I/O: the run collects samples, these turn them into the report's figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def parse_histogram(text: str, name: str) -> dict[str, Any] | None:
    """The buckets, sum and count of one Prometheus histogram (no labels) from exposition text."""
    buckets: list[tuple[float, float]] = []
    total = count = None
    pattern = re.compile(rf"^{re.escape(name)}_(bucket|sum|count)(?:\{{([^}}]*)\}})?\s+([^\s]+)")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        kind, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if kind == "bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                buckets.append((float(le.group(1)), value))  # float("+Inf") is inf
        elif kind == "sum":
            total = value
        else:
            count = value
    if count is None:
        return None
    return {"buckets": sorted(buckets), "sum": total or 0.0, "count": count}


def histogram_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    if after is None:
        return None
    if before is None:
        return after
    old = dict(before["buckets"])
    return {
        "buckets": [(le, value - old.get(le, 0.0)) for le, value in after["buckets"]],
        "sum": after["sum"] - before["sum"],
        "count": after["count"] - before["count"],
    }


def histogram_quantile(hist: dict[str, Any] | None, q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile (q in 0..1); None without samples."""
    if not hist or hist["count"] <= 0:
        return None
    target = q * hist["count"]
    for le, cumulative in hist["buckets"]:
        if cumulative >= target:
            return le
    return math.inf
