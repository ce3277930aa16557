"""Small statistics for benchmark results: percentiles of samples, and of Prometheus histogram deltas."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation between closest ranks; nan when empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


Buckets = list[tuple[float, float]]  # (upper bound "le", cumulative count), ascending, ending with +Inf


def bucket_delta(after: Buckets, before: Buckets | None) -> Buckets:
    """The histogram of the observations made between two scrapes."""
    if not before:
        return list(after)
    prior = dict(before)
    return [(le, count - prior.get(le, 0.0)) for le, count in after]


def histogram_quantile(q: float, buckets: Buckets) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding the quantile."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


def histogram_max_bound(buckets: Buckets) -> float:
    """Upper bound of the highest non-empty bucket: the largest observation is at most this."""
    previous = 0.0
    result = math.nan
    for le, count in buckets:
        if count > previous:
            result = le
        previous = count
    return result


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the non-nan ``values``; all nan when there are none."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan, math.nan
    return statistics.median(clean), min(clean), max(clean)


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Pairwise ratios (per round); a pair with a zero or nan denominator gives nan."""
    return [n / d if d and not math.isnan(d) else math.nan for n, d in zip(numerators, denominators)]
