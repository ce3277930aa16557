"""``worker-gateway loadtest``: drive a gateway with ``load``-agent sessions and report whether anything was lost.

Each session gets its own :class:`~gateway.client.GatewayClient` connection and runs its turns one after the
other (``--concurrency`` bounds how many turns run at once across sessions).  A separate connection sends
app-level ``gateway.ping`` requests to measure how responsive the gateway's event loop stays; a sampler reads
``/healthz`` (and, with ``--spawn``, counts the gateway's child processes).  With ``--chaos`` random session
connections are aborted mid-turn, so the run also proves that reconnect + resume loses nothing.

The verdict is computed from what the load test itself saw, not from the client's counters: every session
ends with ``session.closed``, whose ``seq`` is the session's last, so ``lost = last seq - distinct seqs
received``.  Exit status: 0 when no event was lost and no turn failed, 1 otherwise, 2 for a usage or setup
error (bad flags, gateway not reachable, token refused, ``--plot`` without matplotlib).

Modules by job: ``cli`` (flags, exit status), ``target`` (which gateway, spawning, pre-flight checks),
``run`` (sessions and turns), ``probes`` (ping process, sampler, chaos), ``stats`` (percentiles,
histograms), ``report`` (verdict, table, plot), ``progress`` (live view).
"""

from __future__ import annotations

from gateway.loadtest.cli import build_parser, main
from gateway.loadtest.probes import pinger_child
from gateway.loadtest.run import load_prompt, run_load, turns_per_session
from gateway.loadtest.stats import histogram_delta, histogram_quantile, parse_histogram, percentile
from gateway.loadtest.target import SetupError, Target, check_target, http_get, resolve_target, spawn_gateway

__all__ = [
    "SetupError",
    "Target",
    "build_parser",
    "check_target",
    "histogram_delta",
    "histogram_quantile",
    "http_get",
    "load_prompt",
    "main",
    "parse_histogram",
    "percentile",
    "pinger_child",
    "resolve_target",
    "run_load",
    "spawn_gateway",
    "turns_per_session",
]
