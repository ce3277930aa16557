"""Loop-lag monitor: how late the gateway's event loop wakes up, the number the whole design protects.

A task sleeps ``interval`` and records how much later than asked it resumed.  The recent window feeds
``/healthz`` (max and p99); an optional observer (the Prometheus histogram) sees every sample.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable


class LoopLagMonitor:
    def __init__(
        self, interval_s: float = 0.1, window: int = 600, observer: Callable[[float], None] | None = None
    ) -> None:
        self.interval_s = interval_s
        self._samples: collections.deque[float] = collections.deque(maxlen=window)
        self._observer = observer
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag_ms = max(0.0, (time.perf_counter() - before - self.interval_s) * 1000.0)
            self._samples.append(lag_ms)
            if self._observer is not None:
                self._observer(lag_ms / 1000.0)

    def snapshot(self) -> dict[str, float]:
        """Recent lag in milliseconds: last, p99 and max over the window (about a minute)."""
        if not self._samples:
            return {"last": 0.0, "p99": 0.0, "max": 0.0}
        ordered = sorted(self._samples)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return {"last": round(self._samples[-1], 3), "p99": round(p99, 3), "max": round(ordered[-1], 3)}
