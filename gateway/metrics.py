"""Prometheus metrics of one gateway run, on a registry of its own (so tests can run several servers).

Counters and histograms are updated where things happen (``gateway/app.py``, ``gateway/sessions.py``);
gauges that mirror live state (sessions by status, workers, warm pool, terminals, recent loop lag) are read
from that state when ``/metrics`` is rendered, so they can never drift from it.  The per-event counters
of the relay are plain integers (:class:`LoopCounter`): they are bumped on the loop for every event.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector


class LiveState(Protocol):
    """What the gauges are read from at render time (the gateway's state; nothing here imports it)."""

    @property
    def sessions(self) -> Any: ...  # .count_by_status() -> dict[str, int]

    @property
    def backend(self) -> Any: ...  # .live_workers, .pool_ready

    @property
    def terminals(self) -> Any: ...  # .count

    @property
    def lag(self) -> Any: ...  # .snapshot() -> {"p99": ms, "max": ms}


#: Loop lag: fine below 50 ms (the range the design promises to stay in), coarse above it (the range an
#: in-process design lives in), so that a p99 interpolated from the buckets is meaningful in both.
LAG_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
)
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: ``turn.complete`` payloads are small; one larger than this is counted without reading its status.
_MAX_STATUS_PAYLOAD = 4096
_TURN_STATUSES = frozenset({"ok", "error", "interrupted"})


class LoopCounter:
    """A counter only ever incremented on the event loop's thread: a plain number, no lock.

    ``prometheus_client.Counter.inc`` takes a mutex and validates on every call; at tens of thousands of
    relayed events per second (three increments each) that was a few percent of the loop's time.
    """

    __slots__ = ("documentation", "name", "value")

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _LoopCounters(Collector):
    def __init__(self, counters: list[LoopCounter]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        for counter in self._counters:
            yield CounterMetricFamily(counter.name, counter.documentation, value=counter.value)

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.loop_lag = Histogram(
            "wg_loop_lag_seconds",
            "How late the event loop woke up (sampled every 100 ms)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.ws_connections = Gauge("wg_websocket_connections", "Open /ws connections", registry=r)
        self.ws_connections_total = Counter("wg_websocket_connections_opened", "Accepted /ws connections", registry=r)
        self.handshake_rejections = Counter(
            "wg_handshake_rejections", "Rejected handshakes and requests by reason", ["reason"], registry=r
        )
        self.requests = Counter("wg_requests", "JSON-RPC requests by method", ["method"], registry=r)
        # The relay's hot path: one increment of each per event.
        self.events_relayed = LoopCounter("wg_events_relayed", "Session events relayed from workers")
        self.bytes_relayed = LoopCounter("wg_event_bytes_relayed", "Bytes of session events relayed")
        self.bytes_sent = LoopCounter("wg_ws_bytes_sent", "Bytes sent on /ws connections")
        r.register(_LoopCounters([self.events_relayed, self.bytes_relayed, self.bytes_sent]))
        self.reaps = Counter("wg_session_closes", "Sessions closed, by reason", ["reason"], registry=r)
        self.turns = Counter("wg_turns_completed", "Turns completed, by status", ["status"], registry=r)
        self.worker_start = Histogram(
            "wg_worker_start_seconds", "session.create until the worker is ready", buckets=LATENCY_BUCKETS, registry=r
        )
        self.teardown = Histogram(
            "wg_teardown_seconds",
            "Teardown funnel: start until every process group is gone",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_exits = Counter("wg_worker_exits", "Worker exits, expected or not", ["expected"], registry=r)
        self._sessions = Gauge("wg_sessions", "Live sessions by status", ["status"], registry=r)
        self._workers = Gauge("wg_workers_alive", "Agent worker processes alive (pooled and in use)", registry=r)
        self._pool = Gauge("wg_warm_pool_ready", "Warm workers ready in the pool", registry=r)
        self._terminals = Gauge("wg_terminals", "Open terminals", registry=r)
        # Backends that place workers on several nodes (Ray) report these; the local backend does not.
        self._backend_workers = Gauge("wg_backend_workers", "Workers handed out, per node", ["node"], registry=r)
        self._backend_failures = Gauge(
            "wg_backend_placement_failures",
            "Sessions refused: no node had room within the placement deadline (since start)",
            registry=r,
        )
        self._backend_acquire = Gauge(
            "wg_backend_acquire_seconds",
            "Time to get a ready worker from the backend, over its recent acquisitions",
            ["stat"],
            registry=r,
        )
        self._lag_recent = Gauge(
            "wg_loop_lag_recent_seconds",
            "Loop lag over the monitor's recent window (about a minute)",
            ["stat"],
            registry=r,
        )

    def turn_completed(self, payload_json: bytes) -> None:
        """Count a ``turn.complete`` by its status, read from the (small) pre-encoded payload."""
        status = "unknown"
        if len(payload_json) <= _MAX_STATUS_PAYLOAD:
            try:
                value = json.loads(payload_json).get("status")
            except (ValueError, AttributeError):
                value = None
            if value in _TURN_STATUSES:
                status = value
        self.turns.labels(status=status).inc()

    def render(self, state: LiveState) -> tuple[bytes, str]:
        """Refresh the gauges that are read from live state, then render the exposition text."""
        self._sessions.clear()
        if state.sessions is not None:
            for status, count in state.sessions.count_by_status().items():
                self._sessions.labels(status=status).set(count)
        if state.backend is not None:
            self._workers.set(state.backend.live_workers)
            self._pool.set(state.backend.pool_ready)
            snapshot = getattr(state.backend, "metrics_snapshot", None)
            if snapshot is not None:
                values = snapshot()
                self._backend_workers.clear()
                for node, count in values["workers_per_node"].items():
                    self._backend_workers.labels(node=node).set(count)
                self._backend_failures.set(values["placement_failures"])
                for stat, seconds in values["acquire_seconds"].items():
                    self._backend_acquire.labels(stat=stat).set(seconds)
        if state.terminals is not None:
            self._terminals.set(state.terminals.count)
        if state.lag is not None:
            recent = state.lag.snapshot()
            for stat in ("p99", "max"):
                self._lag_recent.labels(stat=stat).set(recent[stat] / 1000.0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def snapshot(self) -> dict[str, Any]:
        return {m.name: [(s.labels, s.value) for s in m.samples] for m in self.registry.collect()}
