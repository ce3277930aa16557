"""Which gateway a run drives: a URL given by the user, or a private one spawned for the run, and the
checks that must pass before any load starts (reachable, token accepted), each a :class:`SetupError`
(exit status 2) with a message that says which flag to fix."""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.client import GatewayClient, GatewayError, HandshakeRejected, ReconnectPolicy
from gateway.client.spawn import SpawnedGateway, SpawnError
from gateway.wire import Method


class SetupError(Exception):
    """Something the user has to fix before a run can happen (exit status 2)."""


@dataclass
class Target:
    http_url: str  # http://host:port
    ws_url: str
    token: str | None
    pid: int | None = None  # the spawned gateway, for psutil


def resolve_target(url: str, token: str | None) -> Target:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise SetupError(f"--url {url!r}: use http://HOST:PORT or ws://HOST:PORT/ws")
    query = urllib.parse.parse_qs(parts.query)
    if token is None and query.get("token"):
        token = query["token"][0]
    http_scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    ws_scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return Target(f"{http_scheme}://{parts.netloc}", f"{ws_scheme}://{parts.netloc}{path}", token)


def http_get(target: Target, path: str, auth: bool = False, timeout: float = 5.0) -> str:
    """A small blocking GET (run it with ``asyncio.to_thread``)."""
    request = urllib.request.Request(target.http_url + path)
    if auth and target.token:
        request.add_header("Authorization", f"Bearer {target.token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never via a proxy
    with opener.open(request, timeout=timeout) as response:
        return response.read().decode("utf-8", "replace")


def spawn_gateway(extra_args: Sequence[str], timeout: float) -> tuple[SpawnedGateway, Target]:
    """Start a private gateway with a random token and ``extra_args`` (``--gateway-arg``); the caller
    stops it.  A gateway that does not get ready is stopped here and becomes a SetupError."""
    gateway = SpawnedGateway(*extra_args, token=secrets.token_urlsafe(18))
    try:
        gateway.start(timeout)
    except SpawnError as exc:
        raise SetupError(str(exc)) from None
    return gateway, Target(gateway.http(), gateway.url(token=False), gateway.token, gateway.pid)


async def check_target(target: Target, timeout: float = 10.0) -> dict[str, Any]:
    """Fail fast, before any load: the gateway answers ``/healthz`` and accepts the token.

    Returns its ``gateway.info`` (version, limits) for the report.
    """
    try:
        await asyncio.to_thread(http_get, target, "/healthz")
    except OSError as exc:  # urllib.error.URLError is an OSError
        raise SetupError(f"gateway not reachable at {target.http_url}/healthz: {exc}") from exc
    client = GatewayClient(
        target.ws_url, token=target.token, reconnect=ReconnectPolicy(enabled=False), open_timeout=timeout
    )
    try:
        await client.connect()
        return await client.request(Method.INFO, timeout=timeout)
    except HandshakeRejected as exc:
        status = (exc.data or {}).get("status")
        if target.token:
            hint = "the token was refused: pass the gateway's token with --token (or $WORKER_GATEWAY_TOKEN)"
        else:
            hint = "it needs a token: pass it with --token (or $WORKER_GATEWAY_TOKEN)"
        raise SetupError(
            f"the gateway at {target.http_url} refused the WebSocket handshake with HTTP {status}: {hint}"
        ) from None
    except (TimeoutError, OSError, GatewayError) as exc:
        raise SetupError(f"gateway not usable at {target.ws_url}: {type(exc).__name__}: {exc}") from exc
    finally:
        await client.aclose()
