"""The per-connection keepalive policy (PROTOCOL section 1): the pure decision, then a real gateway."""

from __future__ import annotations

import asyncio

import pytest

from support import GatewayProcess, RpcClient
from edge_helpers import StoppableClient, active, wait_detached, wait_reaped
from gateway import keepalive
from gateway.keepalive import PingPolicy, PingReason, connection_policy
from gateway.wire import PROXY_HEADERS


def decide(peer: str | None = "127.0.0.1", headers: tuple[str, ...] = ("host", "upgrade"),
           bind_loopback: bool = True, explicit: bool = False, interval: float | None = None,
           timeout: float | None = None) -> PingPolicy:
    return connection_policy(bind_loopback=bind_loopback, explicit=explicit, configured_interval=interval,
                             configured_timeout=timeout, peer_host=peer, header_names=headers)


def test_direct_loopback_peer_on_loopback_bind_has_ping_off() -> None:
    assert decide() == PingPolicy(None, None, PingReason.LOOPBACK_PEER)
    assert decide(peer="::1").reason is PingReason.LOOPBACK_PEER
    assert decide(peer="127.8.9.10").reason is PingReason.LOOPBACK_PEER
    assert decide(peer="::ffff:127.0.0.1").reason is PingReason.LOOPBACK_PEER


@pytest.mark.parametrize("header", PROXY_HEADERS + ("X-Forwarded-For", "CF-Ray", "Forwarded"))
def test_proxy_header_gets_the_public_policy(header: str) -> None:
    assert decide(headers=("host", header)) == PingPolicy(20.0, 20.0, PingReason.PROXIED)


@pytest.mark.parametrize("peer", ["192.168.1.7", "10.0.0.1", "2001:db8::1", "::ffff:10.0.0.1"])
def test_remote_peer_gets_the_public_policy(peer: str) -> None:
    assert decide(peer=peer) == PingPolicy(20.0, 20.0, PingReason.REMOTE_PEER)


def test_public_bind_pings_every_connection() -> None:
    assert decide(bind_loopback=False) == PingPolicy(20.0, 20.0, PingReason.PUBLIC_BIND)


def test_explicit_values_win_for_every_connection() -> None:
    for peer, headers in (("127.0.0.1", ()), ("127.0.0.1", ("x-real-ip",)), ("10.1.1.1", ())):
        assert decide(peer=peer, headers=headers, explicit=True, interval=1.0, timeout=2.0) == \
            PingPolicy(1.0, 2.0, PingReason.EXPLICIT)
    # Explicitly off wins too, even for a proxied connection.
    assert decide(headers=("cf-ray",), explicit=True) == PingPolicy(None, None, PingReason.EXPLICIT)


def test_unrelated_headers_do_not_count_as_proxied() -> None:
    assert not keepalive.carries_proxy_header(["x-forwarded", "forwarded-for", "x-real", "cookie"])


def test_stall_timeout_only_when_the_ping_is_fully_on() -> None:
    assert PingPolicy(1.0, 2.0, PingReason.EXPLICIT).stall_timeout == 3.0
    assert PingPolicy(1.0, None, PingReason.EXPLICIT).stall_timeout is None
    assert PingPolicy(None, None, PingReason.LOOPBACK_PEER).stall_timeout is None


def test_scope_round_trip_and_fallback() -> None:
    policy = PingPolicy(20.0, 20.0, PingReason.PROXIED)
    scope = {"extensions": {keepalive.SCOPE_EXTENSION: keepalive.to_scope(policy)}}
    assert keepalive.from_scope(scope, PingPolicy(None, None, PingReason.LOOPBACK_PEER)) == policy
    fallback = PingPolicy(None, None, PingReason.LOOPBACK_PEER)
    assert keepalive.from_scope({"extensions": {}}, fallback) is fallback


# --- against a real gateway ---------------------------------------------------------------------------------

async def ready_ping(gw: GatewayProcess, headers: dict[str, str] | None = None) -> dict:
    async with RpcClient.connect(gw.url(), additional_headers=headers or {}) as client:
        return client.events[0]["payload"]["ping"]


async def test_ready_reports_each_connections_own_policy(gateway) -> None:
    assert await ready_ping(gateway) == {"interval": None, "timeout": None}
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP", "CF-Connecting-IP", "CF-Ray"):
        value = "for=203.0.113.7" if header == "Forwarded" else "203.0.113.7"
        assert await ready_ping(gateway, {header: value}) == {"interval": 20.0, "timeout": 20.0}, header
    # And the direct connection next to them is still unpinged.
    assert await ready_ping(gateway) == {"interval": None, "timeout": None}


async def test_explicit_flags_win_for_proxied_and_direct_connections(gateway_factory) -> None:
    gw = gateway_factory("--ws-ping-interval", "3", "--ws-ping-timeout", "4")
    assert await ready_ping(gw) == {"interval": 3.0, "timeout": 4.0}
    assert await ready_ping(gw, {"X-Forwarded-For": "203.0.113.7"}) == {"interval": 3.0, "timeout": 4.0}
    off = gateway_factory(env={"WORKER_GATEWAY_WS_PING_INTERVAL": "none", "WORKER_GATEWAY_WS_PING_TIMEOUT": "none"})
    assert await ready_ping(off, {"CF-Ray": "8a1b2c3d4e5f-AMS"}) == {"interval": None, "timeout": None}


def test_startup_line_states_the_policy(gateway) -> None:
    line = next(l for l in gateway.stderr().splitlines() if "serving on" in l)
    assert "ping off for direct loopback peers, 20s/20s for proxied or remote ones" in line


async def test_stopped_proxied_client_is_aborted_and_detached(gateway_factory) -> None:
    """Explicit short pings (flags) for test speed: detached within interval + timeout + a margin."""
    gw = gateway_factory("--ws-ping-interval", "1", "--ws-ping-timeout", "1", "--grace-s", "1.5")
    client = StoppableClient(gw.url(), "X-Forwarded-For")
    try:
        sid = client.hello["session_id"]
        assert client.hello["ping"] == {"interval": 1.0, "timeout": 1.0}
        client.stop()
        await wait_detached(gw, sid, within=12.0)  # 1 + 1 s, plus a margin for a loaded machine
        await wait_reaped(gw, sid, within=15.0)  # idle: reaped after the 1.5 s grace
        assert "aborting the connection" in gw.stderr()
    finally:
        client.kill()


async def test_stopped_direct_loopback_client_is_kept(gateway_factory) -> None:
    """The loopback rule: a silent direct peer keeps its session attached for longer than the above."""
    gw = gateway_factory("--grace-s", "1.5")
    client = StoppableClient(gw.url())
    try:
        sid = client.hello["session_id"]
        assert client.hello["ping"] == {"interval": None, "timeout": None}
        client.stop()
        loop = asyncio.get_running_loop()
        until = loop.time() + 6.0
        while loop.time() < until:
            sessions = await active(gw)
            assert sessions[sid]["attached"], "a silent direct loopback peer lost its session"
            await asyncio.sleep(0.5)
    finally:
        client.kill()
