"""``/metrics``: Prometheus text that parses, counters that move with the traffic, and its auth rule."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from support import TOKEN, GatewayProcess, RpcClient


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def scrape(gateway: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, keyed by (sample name, sorted labels)."""
    status, text = await asyncio.to_thread(_get, gateway.http("/metrics"), TOKEN)
    assert status == 200, text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_parse_and_counters_move_after_a_turn(gateway: GatewayProcess) -> None:
    before = await scrape(gateway)
    for family in ("wg_loop_lag_seconds_count", "wg_warm_pool_ready", "wg_workers_alive", "wg_terminals",
                   "wg_websocket_connections", "wg_worker_start_seconds_count", "wg_teardown_seconds_count"):
        assert any(name == family for name, _ in before), f"{family} missing from /metrics"

    async with RpcClient.connect(gateway.url()) as client:
        created = await client.call("session.create", agent="echo")
        session_id = created["session_id"]
        done = await client.run_turn(session_id, "one two three")
        assert done["status"] == "ok"
        during = await scrape(gateway)
        await client.call("session.close", session_id=session_id)
    after = await scrape(gateway)

    assert value(during, "wg_websocket_connections") == 1
    assert value(during, "wg_sessions", status="idle") == 1
    assert value(during, "wg_workers_alive") >= 1
    assert value(during, "wg_worker_start_seconds_count") == value(before, "wg_worker_start_seconds_count") + 1
    # turn.start + three message.delta + turn.complete, at least
    assert value(after, "wg_events_relayed_total") >= value(before, "wg_events_relayed_total") + 5
    assert value(after, "wg_event_bytes_relayed_total") > value(before, "wg_event_bytes_relayed_total")
    assert value(after, "wg_ws_bytes_sent_total") > value(before, "wg_ws_bytes_sent_total")
    assert value(after, "wg_turns_completed_total", status="ok") == 1
    assert value(after, "wg_requests_total", method="prompt.submit") == 1
    assert value(after, "wg_session_closes_total", reason="client") == 1
    assert value(after, "wg_teardown_seconds_count") == 1
    assert value(after, "wg_websocket_connections_opened_total") == 1
    assert value(after, "wg_loop_lag_seconds_count") > value(before, "wg_loop_lag_seconds_count")


async def test_metrics_need_the_token(gateway: GatewayProcess) -> None:
    status, body = await asyncio.to_thread(_get, gateway.http("/metrics"))
    assert status == 403 and "token" in body
    status, _ = await asyncio.to_thread(_get, gateway.http("/metrics"), "wrong-token")
    assert status == 403
    samples = await scrape(gateway)
    assert sum(v for (name, _), v in samples.items() if name == "wg_handshake_rejections_total") >= 2


async def test_rejected_websocket_handshake_is_counted(gateway: GatewayProcess) -> None:
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(gateway.url(token=False) + "?token=wrong"):
            pass
    samples = await scrape(gateway)
    assert sum(v for (name, _), v in samples.items() if name == "wg_handshake_rejections_total") == 1


async def test_metrics_public_needs_no_token(gateway_factory: Any) -> None:
    gateway = gateway_factory("--metrics-public")
    status, text = await asyncio.to_thread(_get, gateway.http("/metrics"))
    assert status == 200
    assert any(f.name == "wg_loop_lag_seconds" for f in text_string_to_metric_families(text))
