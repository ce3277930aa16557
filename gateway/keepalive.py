"""The keepalive policy of one connection (PROTOCOL section 1), as a pure function of what its handshake shows.

A bind-wide rule is not enough: a tunnel agent or reverse proxy on this machine (cloudflared, ngrok, nginx)
connects from loopback on behalf of clients anywhere, and a client that vanishes behind it leaves a socket
that never sees a FIN.  So the decision is made per connection, after its handshake request is parsed:

- explicit ``--ws-ping-interval`` / ``--ws-ping-timeout`` (or their environment variables) win;
- a non-loopback bind gets the public policy (20 s / 20 s) for every connection;
- on a loopback bind, a connection whose handshake carries a proxy header (``wire.PROXY_HEADERS``) or whose
  transport peer is not a loopback address gets the public policy;
- only a direct loopback peer has the ping off: a dead local peer is seen by its FIN/RST.

No I/O here: ``gateway/wsproto.py`` applies the decision, and the app reports it in ``gateway.ready``.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.wire import PROXY_HEADERS, PUBLIC_PING_INTERVAL_S, PUBLIC_PING_TIMEOUT_S

#: Key under ``scope["extensions"]`` where the protocol layer leaves the connection's policy for the app.
SCOPE_EXTENSION = "worker_gateway.keepalive"


class PingReason(enum.StrEnum):
    """Why a connection got its keepalive (logged, and useful in tests)."""

    EXPLICIT = "explicit"  #: flags or environment set the ping values
    PUBLIC_BIND = "public_bind"  #: the bind is not loopback
    PROXIED = "proxied"  #: the handshake carries a proxy header
    REMOTE_PEER = "remote_peer"  #: the transport peer is not a loopback address
    LOOPBACK_PEER = "loopback_peer"  #: a direct loopback peer on a loopback bind: ping off


@dataclass(frozen=True)
class PingPolicy:
    """One connection's keepalive: ``None`` means off (interval) or never time out (timeout)."""

    interval: float | None
    timeout: float | None
    reason: PingReason

    @property
    def stall_timeout(self) -> float | None:
        """How long one frame may wait for the transport before the peer counts as gone (see
        ``Connection.stalled``): only when the ping is fully on, so a slow local reader is never dropped."""
        if self.interval is None or self.timeout is None:
            return None
        return self.interval + self.timeout

    def as_wire(self) -> dict[str, float | None]:
        """The ``ping`` field of ``gateway.ready``."""
        return {"interval": self.interval, "timeout": self.timeout}


def is_loopback_address(host: str | None) -> bool:
    """True for an address in 127.0.0.0/8 or ``::1``, including IPv4-mapped IPv6 (``::ffff:127.0.0.1``),
    which Python 3.11's ``is_loopback`` does not recognise.  Names are not resolved: a peer is an address."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def carries_proxy_header(header_names: Iterable[str]) -> bool:
    """True when any header name (any case) is one of ``wire.PROXY_HEADERS``."""
    return any(name.lower() in PROXY_HEADERS for name in header_names)


def connection_policy(
    *,
    bind_loopback: bool,
    explicit: bool,
    configured_interval: float | None,
    configured_timeout: float | None,
    peer_host: str | None,
    header_names: Iterable[str],
    public_interval: float = PUBLIC_PING_INTERVAL_S,
    public_timeout: float = PUBLIC_PING_TIMEOUT_S,
) -> PingPolicy:
    """Decide one connection's keepalive.  ``configured_*`` are the values in effect for the bind (the
    explicit ones when ``explicit``); ``peer_host`` is the transport's peer address (never a forwarded
    one: proxy headers can be forged, the peer cannot), ``None`` when unknown (e.g. a Unix socket)."""
    if explicit:
        return PingPolicy(configured_interval, configured_timeout, PingReason.EXPLICIT)
    if not bind_loopback:
        return PingPolicy(public_interval, public_timeout, PingReason.PUBLIC_BIND)
    if carries_proxy_header(header_names):
        return PingPolicy(public_interval, public_timeout, PingReason.PROXIED)
    if peer_host is not None and not is_loopback_address(peer_host):
        return PingPolicy(public_interval, public_timeout, PingReason.REMOTE_PEER)
    return PingPolicy(None, None, PingReason.LOOPBACK_PEER)


def to_scope(policy: PingPolicy) -> dict[str, Any]:
    return {"interval": policy.interval, "timeout": policy.timeout, "reason": policy.reason.value}


def from_scope(scope: Mapping[str, Any], fallback: PingPolicy) -> PingPolicy:
    """The policy the protocol layer recorded for this connection, or ``fallback`` when it recorded none
    (an ASGI server other than ours, e.g. in-process tests)."""
    recorded = (scope.get("extensions") or {}).get(SCOPE_EXTENSION)
    if not recorded:
        return fallback
    return PingPolicy(recorded["interval"], recorded["timeout"], PingReason(recorded["reason"]))
