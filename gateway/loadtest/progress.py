"""The live view of a run: a ``rich`` panel on a terminal, one plain line every few seconds elsewhere."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from gateway.loadtest.report import fmt
from gateway.loadtest.stats import percentile

if TYPE_CHECKING:
    from gateway.loadtest.run import RunState


class Progress:
    """A live ``rich`` view on a terminal; one plain line every few seconds otherwise (CI, pipes)."""

    def __init__(self, console: Any, enabled: bool, plain_every: float = 5.0) -> None:
        self.console = console
        self.enabled = enabled
        self.plain_every = plain_every
        self._task: asyncio.Task[None] | None = None
        self._live: Any = None

    def start(self, state: RunState) -> None:
        if not self.enabled:
            return
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(self._render(state), console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        self._task = asyncio.get_running_loop().create_task(self._run(state))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    async def _run(self, state: RunState) -> None:
        while True:
            if self._live is not None:
                self._live.update(self._render(state))
                await asyncio.sleep(0.25)
            else:
                await asyncio.sleep(self.plain_every)
                self.console.print(self._line(state), markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def _numbers(state: RunState) -> dict[str, Any]:
        done = sum(s.turns_ok + s.turns_failed for s in state.sessions)
        recent = [ms for _, ms in state.pings[-50:]]
        health = state.health[-1] if state.health else {}
        return {
            "elapsed": state.elapsed(),
            "done": done,
            "failed": sum(s.turns_failed for s in state.sessions),
            "target": state.turns_target,
            "running": state.turns_running,
            "events": sum(s.events for s in state.sessions),
            "lost": sum(s.lost for s in state.sessions),
            "mb": state.bytes_received() / 1e6,
            "drops": sum(c.stats.drops for c in state.clients),
            "ping_p99": percentile(recent, 99),
            "lag": health.get("loop_lag_ms"),
            "workers": health.get("workers"),
        }

    def _line(self, state: RunState) -> str:
        n = self._numbers(state)
        target = "?" if n["target"] is None else n["target"]
        return (
            f"[{n['elapsed']:6.1f}s] turns {n['done']}/{target} ({n['failed']} failed, {n['running']} running) "
            f"events {n['events']} lost {n['lost']} | {n['mb']:.1f} MB | drops {n['drops']} | "
            f"ping p99 {fmt(n['ping_p99'], ' ms')} | loop lag {fmt(n['lag'], ' ms')} | "
            f"workers {fmt(n['workers'])}"
        )

    def _render(self, state: RunState) -> Any:
        from rich.table import Table

        n = self._numbers(state)
        table = Table(title="worker-gateway loadtest", show_header=False, box=None)
        table.add_column(justify="right", style="bold")
        table.add_column()
        target = "?" if n["target"] is None else n["target"]
        table.add_row("elapsed", f"{n['elapsed']:.1f} s")
        table.add_row("turns", f"{n['done']}/{target} done, {n['failed']} failed, {n['running']} running")
        table.add_row("events", f"{n['events']} received, {n['lost']} lost")
        table.add_row("received", f"{n['mb']:.1f} MB")
        table.add_row("connection drops", str(n["drops"]))
        table.add_row("app ping p99 (last 50)", fmt(n["ping_p99"], " ms"))
        table.add_row("gateway loop lag", fmt(n["lag"], " ms"))
        table.add_row("worker processes", fmt(n["workers"]))
        return table
