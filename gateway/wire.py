"""The wire vocabulary: every code and name a client can see, defined once (PROTOCOL sections 1 to 6).

A leaf module: it imports nothing of the project, so the server, the Python client, the load test, the
benchmarks and the tests all name things the same way.  The dashboard's ``static/js/protocol.js`` mirrors
it, and ``tests/unit/test_wire_js.py`` checks that the two agree.  (``WORKER_EVENT_TYPES`` is the one
server-side name here: which of those event types the gateway takes from a worker.)
"""

from __future__ import annotations

import enum

PROTOCOL_VERSION = 1
JSONRPC_VERSION = "2.0"

#: The line a starting server prints on stdout once it accepts connections (``<prefix> port=N``).
READY_LINE_PREFIX = "WORKER_GATEWAY_READY"
#: Subprotocol a client offers (and the server selects) on ``/ws`` and ``/pty``.
SUBPROTOCOL = "worker-gateway.v1"
#: A subprotocol of this prefix carries the token: ``worker-gateway.token.<T>``.
TOKEN_SUBPROTOCOL_PREFIX = "worker-gateway.token."
#: The dashboard's cookie.  The server scopes it per port (see ``gateway.auth.cookie_name``).
COOKIE_NAME = "wg_token"


class ErrorCode(enum.IntEnum):
    """JSON-RPC error codes (PROTOCOL section 4)."""

    PARSE_ERROR = -32700  #: the frame is not JSON
    INVALID_REQUEST = -32600  #: JSON, but not a JSON-RPC request object
    METHOD_NOT_FOUND = -32601  #: no such method
    INVALID_PARAMS = -32602  #: wrong type, missing or unknown key, value out of range
    INTERNAL_ERROR = -32603  #: a bug: the gateway could not complete a valid request
    NOT_FOUND = 4001  #: no such session or terminal (closed, or never existed)
    UNKNOWN_AGENT = 4004  #: the agent name does not resolve
    BUSY = 4009  #: the session's prompt queue is full
    NOT_SUPPORTED = 4010  #: not available on this platform or backend
    LIMIT_REACHED = 4029  #: a configured limit (sessions, terminals, rate, connections, fds)
    WORKER_START_FAILED = 5001  #: no worker could be made ready for the session
    WORKER_DIED = 5002  #: the session's worker died while the request needed it
    STORE_UNAVAILABLE = 5003  #: the session store cannot write (disk full, I/O error)


class EventType(enum.StrEnum):
    """``params.type`` of ``method: "event"`` notifications (PROTOCOL section 4, Events)."""

    GATEWAY_READY = "gateway.ready"
    TURN_START = "turn.start"
    MESSAGE_DELTA = "message.delta"
    REASONING_DELTA = "reasoning.delta"
    TOOL_CALL = "tool.call"
    TOOL_OUTPUT = "tool.output"
    SUBAGENT_START = "subagent.start"
    SUBAGENT_PROGRESS = "subagent.progress"
    SUBAGENT_COMPLETE = "subagent.complete"
    TURN_COMPLETE = "turn.complete"
    WORKER_EXITED = "worker.exited"
    SESSION_DETACHED = "session.detached"
    SESSION_CLOSED = "session.closed"
    REPLAY_TRUNCATED = "replay.truncated"
    SLASH_RESULT = "slash.result"


#: The event types a worker may send: the turn's edges and what the turn handle emits
#: (workers/agents/base.py).  The others are the gateway's own: a worker sending ``session.closed`` or
#: ``worker.exited`` would speak for the gateway, so such a frame is treated as a broken worker's.
WORKER_EVENT_TYPES = frozenset(
    {
        EventType.TURN_START,
        EventType.MESSAGE_DELTA,
        EventType.REASONING_DELTA,
        EventType.TOOL_CALL,
        EventType.TOOL_OUTPUT,
        EventType.SUBAGENT_START,
        EventType.SUBAGENT_PROGRESS,
        EventType.SUBAGENT_COMPLETE,
        EventType.TURN_COMPLETE,
    }
)


class CloseReason(enum.StrEnum):
    """``session.closed`` reasons (PROTOCOL section 4)."""

    CLIENT = "client"
    DISCONNECT = "disconnect"
    GRACE_EXPIRED = "grace_expired"
    IDLE_TIMEOUT = "idle_timeout"
    WORKER_DIED = "worker_died"
    SHUTDOWN = "shutdown"
    BLOCKED = "blocked"  #: extension: detached and unable to make progress for too long
    DELETED = "deleted"  #: extension: removed by ``session.delete``


class TurnStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    INTERRUPTED = "interrupted"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009  #: a client frame larger than ``max_message_bytes``
    INTERNAL_ERROR = 1011  #: keepalive ping timeout (uvicorn / websockets)
    TRY_AGAIN_LATER = 1013  #: the connection limit is reached
    TERMINAL_NOT_FOUND = 4404  #: ``/pty/{id}`` names no terminal
    TERMINAL_SUPERSEDED = 4409  #: a newer connection took over this terminal
    TERMINAL_EXITED = 4410  #: the terminal's program exited (or it was closed)


class Method(enum.StrEnum):
    """Every JSON-RPC method of ``/ws``."""

    PING = "gateway.ping"
    INFO = "gateway.info"
    SESSION_CREATE = "session.create"
    SESSION_RESUME = "session.resume"
    SESSION_EVENTS_SINCE = "session.events.since"
    SESSION_ACK = "session.ack"
    SESSION_CLOSE = "session.close"
    SESSION_ACTIVE_LIST = "session.active_list"
    SESSION_LIST = "session.list"
    SESSION_DELETE = "session.delete"
    SESSION_INTERRUPT = "session.interrupt"
    PROMPT_SUBMIT = "prompt.submit"
    SLASH_EXEC = "slash.exec"
    TERMINAL_OPEN = "terminal.open"
    TERMINAL_RESIZE = "terminal.resize"
    TERMINAL_CLOSE = "terminal.close"
    TERMINAL_LIST = "terminal.list"


#: Headers whose presence says a connection came through a tunnel or reverse proxy (PROTOCOL section 1).
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "cf-connecting-ip", "cf-ray")
#: The keepalive of a connection that is not a direct loopback peer, unless flags say otherwise.
PUBLIC_PING_INTERVAL_S = 20.0
PUBLIC_PING_TIMEOUT_S = 20.0
