"""uvicorn's websockets (sans-I/O) protocol with a per-connection keepalive and an abort for dead peers.

uvicorn applies one ``ws_ping_interval`` / ``ws_ping_timeout`` to every connection.  This subclass decides
them per connection once the handshake request is parsed (``gateway.keepalive.connection_policy``: proxy
headers and the transport's peer address), records the decision in the ASGI scope for ``gateway.ready``,
and changes what a missed pong does: uvicorn sends a close frame and closes the transport gracefully,
which waits for the write buffer to drain, and a peer that stopped reading never drains it (its socket
then stays until the kernel gives up).  Here the transport is aborted: the socket goes at once and the
app sees the disconnect, so the peer's sessions are detached and reaped by the normal rules.

It also offers the app a :class:`gateway.wsframes.FrameSink` in the scope's extensions
(:data:`gateway.wsframes.SCOPE_EXTENSION`): ready-made text frames written to the transport in one
``writelines`` while the connection is open, with the transport's pause/resume as flow control, instead
of one ASGI ``websocket.send`` (and one socket write) per frame.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from gateway import keepalive, wsframes
from gateway.config import Config
from gateway.ratelog import RateLimitedLog

logger = logging.getLogger("worker_gateway.keepalive")
#: Malformed frames are a client's doing: one short line each, rate-limited (uvicorn logs a traceback).
_frame_log = RateLimitedLog(logging.getLogger("worker_gateway.frames"))
#: After the app is done with a connection, the transport is closed gracefully; one that has still not
#: gone after this long (a peer that neither reads nor answers the close) is aborted.
LINGER_ABORT_S = 20.0


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """One WebSocket connection.  Use :func:`protocol_class` to bind it to a gateway ``Config``."""

    gateway_config: ClassVar[Config]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ping_policy: keepalive.PingPolicy | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def handle_connect(self, event: Request) -> None:
        cfg = self.gateway_config
        policy = keepalive.connection_policy(
            bind_loopback=cfg.loopback,
            explicit=cfg.ping_explicit,
            configured_interval=cfg.ws_ping_interval,
            configured_timeout=cfg.ws_ping_timeout,
            peer_host=self.client[0] if self.client else None,
            header_names=[name for name, _ in event.headers.raw_items()],
        )
        self.ping_policy = policy
        self.ping_interval, self.ping_timeout = policy.interval, policy.timeout
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # None when the handshake itself was malformed (answered 400 by websockets)
            scope["extensions"][keepalive.SCOPE_EXTENSION] = keepalive.to_scope(policy)
            if not self.conn.extensions:  # a negotiated extension (e.g. compression) would change the frames
                scope["extensions"][wsframes.SCOPE_EXTENSION] = ProtocolFrameSink(self)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "peer"

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type != "text":
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:  # past websocket.close: discard, as uvicorn does
            return
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            # RFC 6455 section 8.1: fail the connection (1007).  One line, not uvicorn's traceback.
            _frame_log.log(
                logging.WARNING,
                "%s: invalid UTF-8 in a text frame at byte %d: closing with 1007",
                self._peer(),
                exc.start,
            )
            self.conn.send_close(1007)
            self.handle_parser_exception()
            return
        self.queue.put_nowait({"type": "websocket.receive", "text": text})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def keepalive_timeout(self) -> None:
        self.pong_timer = None
        self.pending_ping_payload = None
        if self.disconnected:
            return
        peer = self._peer()
        logger.info(
            "%s: no pong within %gs of a keepalive ping (%s): aborting the connection",
            peer,
            self.ping_timeout or 0,
            self.ping_policy.reason if self.ping_policy else "?",
        )
        self._abort()

    def _abort(self) -> None:
        """Drop the socket now; ``connection_lost`` follows and tells the app (``websocket.disconnect``)."""
        self.close_sent = True
        self.stop_keepalive()
        self.transport.abort()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            self._linger_timer = self.loop.call_later(LINGER_ABORT_S + self.close_timeout, self._abort_lingering)

    def _abort_lingering(self) -> None:
        self._linger_timer = None
        if not self.disconnected:
            logger.info(
                "%s: connection still not closed %gs after its handler ended: aborting it",
                self._peer(),
                LINGER_ABORT_S + self.close_timeout,
            )
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)


class ProtocolFrameSink:
    """:class:`gateway.wsframes.FrameSink` over one connection's transport.

    Frames go straight to the transport, past the websockets state machine: that is sound because they are
    whole unfragmented text frames (nothing for the state machine to track), they are written only in the
    OPEN state before any close frame, and uvicorn writes its own frames (pings, pongs, close) to the
    same transport at frame boundaries, since every write here is whole frames."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: GatewayWebSocketProtocol) -> None:
        self._protocol = protocol

    @property
    def open(self) -> bool:
        protocol = self._protocol
        return (
            protocol.handshake_complete
            and not protocol.close_sent
            and not protocol.disconnected
            and protocol.conn.state is State.OPEN
            and not protocol.transport.is_closing()
        )

    @property
    def paused(self) -> bool:
        return not self._protocol.writable.is_set()

    def buffered(self) -> int:
        return self._protocol.transport.get_write_buffer_size()

    def limit_buffer(self, high: int) -> None:
        transport = self._protocol.transport
        _, current = transport.get_write_buffer_limits()
        if high < current:
            transport.set_write_buffer_limits(high=high)

    async def wait_writable(self) -> None:
        await self._protocol.writable.wait()

    def write_text(self, payloads: list[bytes]) -> int:
        if not self.open:
            raise ConnectionError("the WebSocket is closing or closed")
        self._protocol.transport.writelines(wsframes.text_frame_parts(payloads))
        return sum(map(len, payloads))


def protocol_class(config: Config) -> type[GatewayWebSocketProtocol]:
    """The protocol class for uvicorn's ``ws`` setting, bound to this gateway's settings."""
    return type("GatewayWebSocketProtocol", (GatewayWebSocketProtocol,), {"gateway_config": config})
