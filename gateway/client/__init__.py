"""Python client for the gateway's JSON-RPC channel, with automatic reconnect, session resume and acks.

Usage::

    async with GatewayClient("ws://127.0.0.1:8765/ws", token="...") as client:
        session = await client.create_session(agent="echo")
        await client.submit(session["session_id"], "hello world")
        async for event in client.events(session["session_id"]):
            if event["type"] == "turn.complete":
                break

Contract (``docs/client.md`` has the long form):

- ``call(method, **params)`` returns the ``result`` object or raises a :class:`GatewayError` subclass that
  carries the JSON-RPC ``code`` (:class:`SessionNotFound` for 4001, :class:`InvalidParams` for -32602...).
- Every session the client created or resumed is *owned*: its events are queued per session, in ``seq``
  order, and read with ``events(session_id)``.
- When the connection drops without the client closing it, calls waiting for an answer fail at once with
  :class:`ConnectionLost` (a request such as ``prompt.submit`` is never re-sent: it may have been
  processed), and the client reconnects with jittered exponential backoff (bounded by attempts and time)
  and sends ``session.resume`` with the last *processed* ``seq`` (the last one its iterators handed out)
  for every owned session.  Events are deduplicated by ``seq``, so an ``events()`` iterator sees one
  gapless stream across reconnects.  A gap the gateway cannot fill (``replay.truncated``) is raised from
  the iterator as :class:`ReplayTruncated`, never skipped silently.
- The client acknowledges what its callers have processed with ``session.ack`` (every 256 events or
  0.25 s), so the gateway knows what it may stop keeping for a replay; an older gateway that answers
  -32601 makes it stop acking, silently.
- The client does not offer permessage-deflate: compressing would cost CPU on the gateway's event loop,
  which must only relay bytes.

The package imports nothing of the project but the wire vocabulary (``gateway.wire``).
``gateway.client.spawn`` starts a private gateway process for tests, benchmarks and the load test.
"""

from __future__ import annotations

from gateway.client.acks import AckPolicy, AckSupport
from gateway.client.errors import (
    Busy,
    CallTimeout,
    ConnectionLost,
    GatewayError,
    HandshakeRejected,
    InternalError,
    InvalidParams,
    InvalidRequest,
    LimitReached,
    MethodNotFound,
    NotSupported,
    ParseError,
    ReplayTruncated,
    SessionNotFound,
    StoreUnavailable,
    UnknownAgent,
    WorkerDied,
    WorkerFailed,
    WorkerStartFailed,
    error_from_response,
)
from gateway.client.gateway_client import GatewayClient
from gateway.client.policy import ClientState, ClientStats, ReconnectPolicy
from gateway.client.streams import SessionEvents
from gateway.client.urls import normalize_url

__all__ = [
    "AckPolicy",
    "AckSupport",
    "Busy",
    "CallTimeout",
    "ClientState",
    "ClientStats",
    "ConnectionLost",
    "GatewayClient",
    "GatewayError",
    "HandshakeRejected",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "LimitReached",
    "MethodNotFound",
    "NotSupported",
    "ParseError",
    "ReconnectPolicy",
    "ReplayTruncated",
    "SessionEvents",
    "SessionNotFound",
    "StoreUnavailable",
    "UnknownAgent",
    "WorkerDied",
    "WorkerFailed",
    "WorkerStartFailed",
    "error_from_response",
    "normalize_url",
]
