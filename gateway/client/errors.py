"""The client's exception family: one type per JSON-RPC error code (from ``gateway.wire``), plus the
conditions the client detects itself (a lost connection, a timeout, a refused handshake, a gap)."""

from __future__ import annotations

from typing import Any

from gateway.wire import ErrorCode


class GatewayError(Exception):
    """Base of every error this client raises.

    ``code`` is the JSON-RPC error code when the gateway answered with an error, ``None`` for errors the
    client detects itself (a lost connection, a timeout, a gap in a session's stream).
    """

    code: int | None = None

    def __init__(self, code: int | None, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"

    def __str__(self) -> str:
        return self.message if self.code is None else f"[{self.code}] {self.message}"


class ParseError(GatewayError):
    code = ErrorCode.PARSE_ERROR


class InvalidRequest(GatewayError):
    code = ErrorCode.INVALID_REQUEST


class MethodNotFound(GatewayError):
    """-32601: the gateway does not know the method (e.g. an older gateway and a newer method)."""

    code = ErrorCode.METHOD_NOT_FOUND


class InvalidParams(GatewayError):
    code = ErrorCode.INVALID_PARAMS


class InternalError(GatewayError):
    code = ErrorCode.INTERNAL_ERROR


class SessionNotFound(GatewayError):
    """4001: no such session (or terminal); it was closed or never existed on this gateway run."""

    code = ErrorCode.NOT_FOUND


class UnknownAgent(GatewayError):
    code = ErrorCode.UNKNOWN_AGENT


class Busy(GatewayError):
    """4009: the session's prompt queue is full; retry after a turn completes."""

    code = ErrorCode.BUSY


class NotSupported(GatewayError):
    code = ErrorCode.NOT_SUPPORTED


class LimitReached(GatewayError):
    """4029: a gateway limit (sessions, terminals, queued prompts, request rate) is reached."""

    code = ErrorCode.LIMIT_REACHED


class WorkerFailed(GatewayError):
    """5001 or 5002: the session's worker process failed to start or died."""


class WorkerStartFailed(WorkerFailed):
    code = ErrorCode.WORKER_START_FAILED


class WorkerDied(WorkerFailed):
    code = ErrorCode.WORKER_DIED


class StoreUnavailable(GatewayError):
    """5003: the gateway's session store cannot write (disk full, I/O error)."""

    code = ErrorCode.STORE_UNAVAILABLE


class ConnectionLost(GatewayError):
    """The connection dropped (or the client was closed) before the answer arrived, or reconnecting failed.

    A call that fails this way may or may not have been processed by the gateway; the client does not
    re-send it.
    """


class HandshakeRejected(GatewayError):
    """The gateway refused the WebSocket handshake (HTTP status in ``data["status"]``, 403 for a wrong or
    missing token, a foreign Origin or a non-loopback Host on a loopback bind).  Never retried."""


class CallTimeout(GatewayError, TimeoutError):
    """No answer within the call's timeout; the connection itself is still up."""


class ReplayTruncated(GatewayError):
    """Raised from a session's event iterator: events between ``after_seq`` and ``first_seq`` are gone.

    The gateway's replay buffer no longer held them when the client resumed.  Iteration may continue after
    catching it; the next event has ``seq >= first_seq``.
    """

    def __init__(self, session_id: str, after_seq: int, first_seq: int) -> None:
        missing = max(0, first_seq - after_seq - 1)
        super().__init__(
            None,
            f"session {session_id}: events {after_seq + 1}..{first_seq - 1} ({missing}) are no "
            f"longer in the gateway's replay buffer",
            {"session_id": session_id, "after_seq": after_seq, "first_seq": first_seq},
        )
        self.session_id = session_id
        self.after_seq = after_seq
        self.first_seq = first_seq
        self.missing = missing


_ERRORS_BY_CODE: dict[int, type[GatewayError]] = {
    int(cls.code or 0): cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        SessionNotFound,
        UnknownAgent,
        Busy,
        NotSupported,
        LimitReached,
        WorkerStartFailed,
        WorkerDied,
        StoreUnavailable,
    )
}


def error_from_response(error: dict[str, Any]) -> GatewayError:
    """The typed exception for a JSON-RPC ``error`` object (unknown codes give a plain GatewayError)."""
    code = error.get("code")
    cls = _ERRORS_BY_CODE.get(code, GatewayError) if isinstance(code, int) else GatewayError
    return cls(code, str(error.get("message", "")), error.get("data"))
