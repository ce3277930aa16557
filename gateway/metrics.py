"""Prometheus metrics of one gateway run, on a registry of its own (so tests can run several servers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from gateway.app import GatewayState

_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.loop_lag = Histogram("wg_loop_lag_seconds", "How late the event loop woke up", buckets=_LAG_BUCKETS,
                                  registry=r)
        self.ws_connections = Gauge("wg_websocket_connections", "Open /ws connections", registry=r)
        self.ws_connections_total = Counter("wg_websocket_connections_opened", "Accepted /ws connections",
                                            registry=r)
        self.handshake_rejections = Counter("wg_handshake_rejections", "Rejected handshakes and requests by reason",
                                            ["reason"], registry=r)
        self.requests = Counter("wg_requests", "JSON-RPC requests by method", ["method"], registry=r)
        self.events_relayed = Counter("wg_events_relayed", "Session events relayed from workers", registry=r)
        self.bytes_relayed = Counter("wg_event_bytes_relayed", "Bytes of session events relayed", registry=r)
        self.bytes_sent = Counter("wg_ws_bytes_sent", "Bytes sent on /ws connections", registry=r)
        self.reaps = Counter("wg_session_closes", "Sessions closed, by reason", ["reason"], registry=r)
        self.turns = Counter("wg_turns_completed", "Turns completed, by status", ["status"], registry=r)
        self.worker_start = Histogram("wg_worker_start_seconds", "session.create until the worker is ready",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.teardown = Histogram("wg_teardown_seconds", "Teardown funnel: start until every process group is gone",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.worker_exits = Counter("wg_worker_exits", "Worker exits, expected or not", ["expected"], registry=r)
        self._sessions = Gauge("wg_sessions", "Live sessions by status", ["status"], registry=r)
        self._workers = Gauge("wg_workers_alive", "Agent worker processes alive", registry=r)
        self._pool = Gauge("wg_warm_pool_ready", "Warm workers ready in the pool", registry=r)
        self._terminals = Gauge("wg_terminals", "Open terminals", registry=r)

    def render(self, state: GatewayState) -> tuple[bytes, str]:
        """Refresh the gauges that are read from live state, then render the exposition text."""
        self._sessions.clear()
        if state.sessions is not None:
            for status, count in state.sessions.count_by_status().items():
                self._sessions.labels(status=status).set(count)
        if state.supervisor is not None:
            self._workers.set(state.supervisor.live_workers)
            self._pool.set(state.supervisor.pool_ready)
        if state.terminals is not None:
            self._terminals.set(state.terminals.count)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def snapshot(self) -> dict[str, Any]:
        return {m.name: [(s.labels, s.value) for s in m.samples] for m in self.registry.collect()}
