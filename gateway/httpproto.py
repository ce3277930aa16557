"""uvicorn's HTTP protocol with a deadline for the request head and a cap on connections still sending one.

Slowloris: uvicorn waits forever for a connection that sends nothing or a partial request head (its
keep-alive timeout only starts after a response), so such connections pile up until the process runs out
of file descriptors and real clients (and workers, which need pipes) fail.  Here:

- every request head (the first on a connection, and each later one on a keep-alive connection, from its
  first byte) must be complete within ``handshake_timeout_s``, else the connection is closed;
- at most ``max_pending_connections`` connections (and never more than a quarter of the process's file
  descriptor limit) may be waiting for their first request head; beyond that the *oldest* waiting one is
  aborted to make room.  A real client sends its head in the first packet, so it is never the oldest for
  long, while a slowloris client cannot hold a slot.

The timers are plain ``call_later`` handles: no task per connection, nothing on the loop but a check.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from typing import Any, ClassVar

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from gateway.config import Config
from gateway.ratelog import RateLimitedLog

_log = RateLimitedLog(logging.getLogger("worker_gateway.edge"))


def pending_cap(configured: int, nofile_soft_limit: int | None) -> int:
    """The effective cap: the knob, but at most a quarter of the fd limit (other fds are sockets of
    accepted clients, worker pipes and the store), and at least 1."""
    if nofile_soft_limit is None or nofile_soft_limit <= 0:
        return max(1, configured)
    return max(1, min(configured, nofile_soft_limit // 4))


def _nofile() -> int | None:
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """Use :func:`protocol_class` to bind it to a gateway ``Config``."""

    gateway_config: ClassVar[Config]
    cap: ClassVar[int]
    #: Connections waiting for their first request head, oldest first (shared by the class's instances).
    pending: ClassVar[collections.OrderedDict[int, GuardedHTTPProtocol]]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_timer: asyncio.TimerHandle | None = None
        self._armed_cycle: Any = None
        self._make_room()
        self.pending[id(self)] = self
        self._arm()

    def _make_room(self) -> None:
        pending = self.pending
        for key, proto in list(pending.items()):  # forget the ones that got their head (or went)
            if not proto._waiting_for_head():
                del pending[key]
        while len(pending) >= self.cap:
            _, oldest = pending.popitem(last=False)
            _log.log(
                logging.WARNING,
                "%s: %d connections are waiting for a request head (cap %d): dropping the oldest",
                oldest._peer(),
                len(pending) + 1,
                self.cap,
            )
            oldest._disarm()
            oldest.transport.abort()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "peer"

    def _upgraded(self) -> bool:
        return self.transport.get_protocol() is not self

    def _waiting_for_head(self) -> bool:
        return self.cycle is None and not self._upgraded() and not self.transport.is_closing()

    def _arm(self) -> None:
        self._disarm()
        self._armed_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.gateway_config.handshake_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        self.pending.pop(id(self), None)
        if self._upgraded() or self.transport.is_closing():
            return
        if self.cycle is not self._armed_cycle:  # a new request head arrived in time
            return
        _log.log(
            logging.INFO,
            "%s: no complete request head within %gs: closing the connection",
            self._peer(),
            self.gateway_config.handshake_timeout_s,
        )
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is not None and self.cycle.response_complete
        super().data_received(data)
        # A keep-alive connection that starts a new request: its head has the same deadline.
        if idle and not self._upgraded() and self.cycle is not None and self.cycle.response_complete:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.pending.pop(id(self), None)
        super().connection_lost(exc)


def protocol_class(config: Config) -> type[GuardedHTTPProtocol]:
    """The HTTP protocol class for uvicorn's ``http`` setting, bound to this gateway's settings."""
    return type(
        "GuardedHTTPProtocol",
        (GuardedHTTPProtocol,),
        {
            "gateway_config": config,
            "cap": pending_cap(config.max_pending_connections, _nofile()),
            "pending": collections.OrderedDict(),
        },
    )
