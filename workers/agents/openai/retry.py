"""When to retry a request to the provider, and after how long (pure: no I/O).

Only before the first token: a retry after text streamed would show the user that text twice, so the
caller asks only while nothing was streamed.  Retried: connection failures, 429 and 5xx; every other
answer is final.  ``Retry-After`` (seconds or an HTTP date) is honoured up to ``max_delay_s``.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

RETRIED_STATUSES = frozenset({429}) | frozenset(range(500, 600))


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(
        self, attempt: int, status: int | None, retry_after: str | None = None, now: float | None = None
    ) -> float | None:
        """Seconds to wait before retry number ``attempt + 1`` (``attempt`` counts failures so far, from
        0), or None to give up.  ``status`` None means the connection failed."""
        if attempt >= self.max_retries:
            return None
        if status is not None and status not in RETRIED_STATUSES:
            return None
        backoff = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        asked = parse_retry_after(retry_after, now)
        return backoff if asked is None else min(self.max_delay_s, max(asked, 0.0))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds from now: delta-seconds or an HTTP date; None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
