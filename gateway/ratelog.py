"""One-line log records that a client can trigger, rate-limited so that a client cannot grow the log.

Rejected handshakes and malformed frames are worth one line each (a tunnel set-up that gets Host or
Origin wrong is diagnosed from that line), but a client can produce them as fast as it can connect.  Up to
``burst`` lines pass at once, then ``rate_per_s``; what is dropped is counted and reported on the next line
that passes, so the log says how much it left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.ratelimit import TokenBucket


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        rate_per_s: float = 2.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._bucket = TokenBucket(rate_per_s, burst, clock)
        self.suppressed = 0

    def log(self, level: int, message: str, *args: Any) -> bool:
        """Log one line unless over the rate; returns whether it was written."""
        if not self._bucket.take():
            self.suppressed += 1
            return False
        if self.suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self._logger.log(level, message, *args)
        return True
