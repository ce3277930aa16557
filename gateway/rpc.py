"""JSON-RPC 2.0 for the ``/ws`` channel: parsing, validation and encoding, with no I/O.

Everything here is a pure function of its inputs, so the whole wire contract of section 4 of the protocol
(error codes included) is unit-tested without a server.  The I/O layer (``gateway/app.py``) calls
``parse_request``, dispatches, and sends what ``encode_result`` / ``encode_error`` / ``encode_event`` return.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gateway.wire import JSONRPC_VERSION, ErrorCode

JSONRPC = JSONRPC_VERSION

# The codes live in the wire vocabulary; these names are kept for the handlers' brevity.
PARSE_ERROR = ErrorCode.PARSE_ERROR
INVALID_REQUEST = ErrorCode.INVALID_REQUEST
METHOD_NOT_FOUND = ErrorCode.METHOD_NOT_FOUND
INVALID_PARAMS = ErrorCode.INVALID_PARAMS
INTERNAL_ERROR = ErrorCode.INTERNAL_ERROR
NOT_FOUND = ErrorCode.NOT_FOUND
UNKNOWN_AGENT = ErrorCode.UNKNOWN_AGENT
BUSY = ErrorCode.BUSY
NOT_SUPPORTED = ErrorCode.NOT_SUPPORTED
LIMIT_REACHED = ErrorCode.LIMIT_REACHED
WORKER_START_FAILED = ErrorCode.WORKER_START_FAILED
WORKER_DIED = ErrorCode.WORKER_DIED
STORE_UNAVAILABLE = ErrorCode.STORE_UNAVAILABLE

MAX_ID_LENGTH = 256
#: Integers beyond this are not exact in JavaScript clients and are refused in params (-32602).
MAX_INT = 2**53 - 1


class RpcError(Exception):
    """An error answer: carries its JSON-RPC code, a message a user can act on, and optional data."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    def __repr__(self) -> str:
        return f"RpcError({self.code}, {self.message!r})"


@dataclass(frozen=True)
class Request:
    method: str
    params: dict[str, Any]
    id: int | str | None
    is_notification: bool


@dataclass(frozen=True)
class Param:
    """One parameter: the JSON types it accepts and whether it must be present."""

    types: tuple[str, ...]  # of: "string", "int", "number", "bool", "object", "array", "string_list"
    required: bool = False


def _p(*types: str, required: bool = False) -> Param:
    return Param(types, required)


#: Parameters of every method (PROTOCOL section 4 plus documented extensions). Unknown keys are -32602.
METHOD_PARAMS: dict[str, dict[str, Param]] = {
    "gateway.ping": {},
    "gateway.info": {},
    "session.create": {
        "agent": _p("string"),
        "options": _p("object"),
        "cwd": _p("string"),
        "title": _p("string"),
        "close_on_disconnect": _p("bool"),
    },
    "session.resume": {"session_id": _p("string", required=True), "after_seq": _p("int")},
    "session.events.since": {"session_id": _p("string", required=True), "after_seq": _p("int", required=True)},
    "session.ack": {"session_id": _p("string", required=True), "seq": _p("int", required=True)},
    "session.close": {"session_id": _p("string", required=True)},
    "session.list": {"limit": _p("int"), "include_closed": _p("bool")},
    "session.delete": {"session_id": _p("string", required=True)},
    "session.active_list": {},
    "session.interrupt": {"session_id": _p("string", required=True)},
    "prompt.submit": {"session_id": _p("string", required=True), "text": _p("string", required=True)},
    "slash.exec": {"session_id": _p("string", required=True), "command": _p("string", required=True)},
    "terminal.open": {"cols": _p("int"), "rows": _p("int"), "argv": _p("string_list"), "cwd": _p("string")},
    "terminal.resize": {
        "terminal_id": _p("string", required=True),
        "cols": _p("int", required=True),
        "rows": _p("int", required=True),
    },
    "terminal.close": {"terminal_id": _p("string", required=True)},
    "terminal.list": {},
}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise ValueError(f"unknown param type {kind!r}")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def validate_params(method: str, params: dict[str, Any], spec: dict[str, dict[str, Param]] = METHOD_PARAMS) -> None:
    """Raise -32602 naming the offending key for a missing, unknown or wrongly typed parameter."""
    expected = spec[method]
    for key in params:
        if key not in expected:
            allowed = ", ".join(sorted(expected)) or "none"
            raise RpcError(INVALID_PARAMS, f"unknown param {key!r} for {method} (accepted: {allowed})", {"param": key})
    for key, p in expected.items():
        if key not in params:
            if p.required:
                raise RpcError(INVALID_PARAMS, f"missing required param {key!r} for {method}", {"param": key})
            continue
        value = params[key]
        if not any(_type_ok(value, t) for t in p.types):
            want = " or ".join(t.replace("_", " of ") if t != "string_list" else "array of strings" for t in p.types)
            raise RpcError(
                INVALID_PARAMS, f"param {key!r} of {method} must be {want}, got {_type_name(value)}", {"param": key}
            )
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise RpcError(
                INVALID_PARAMS,
                f"param {key!r} of {method} is out of range: integers must lie within +/-{MAX_INT} (2**53 - 1)",
                {"param": key},
            )


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True when ``value`` nests deeper than ``limit`` containers (iterative: no recursion limit to hit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in item)
    return False


#: A hint that a frame may hold an unpaired surrogate: a ``\\uD800``-``\\uDFFF`` escape, or such a code point.
_SURROGATE_HINT = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|[\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def has_lone_surrogate(value: Any) -> bool:
    """True when a string (key or value) anywhere in ``value`` holds an unpaired surrogate.

    ``json.loads`` accepts ``"\\ud800"`` and returns a ``str`` that cannot be encoded as UTF-8, so echoing
    it (in an error, as an id) or forwarding it to a worker would fail later, far from the cause.
    Iterative: no recursion limit to hit."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH


def parse_request(
    text: str | bytes,
    *,
    max_depth: int = 32,
    methods: dict[str, dict[str, Param]] = METHOD_PARAMS,
) -> Request:
    """Parse and validate one client frame.

    Raises :class:`RequestError` carrying the error and the request id to answer with (``None`` when the id
    could not be read), so the caller can always send a well-formed error response.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(RpcError(PARSE_ERROR, f"frame is not valid UTF-8: {exc.reason}"), None) from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise RequestError(RpcError(INVALID_REQUEST, f"request nests deeper than {max_depth} levels"), None) from None
    except ValueError as exc:
        raise RequestError(RpcError(PARSE_ERROR, f"invalid JSON: {exc}"), None) from None
    if not isinstance(obj, dict):
        raise RequestError(RpcError(INVALID_REQUEST, f"a request must be a JSON object, got {_type_name(obj)}"), None)
    raw_id = obj.get("id")
    req_id = raw_id if _valid_id(raw_id) else None
    if _SURROGATE_HINT.search(text) and has_lone_surrogate(obj):
        if has_lone_surrogate(req_id):
            req_id = None
        raise RequestError(
            RpcError(
                INVALID_REQUEST,
                "request holds a string with an unpaired UTF-16 surrogate "
                '(e.g. "\\ud800"): strings must be valid Unicode',
            ),
            req_id,
        )
    if json_depth_exceeds(obj, max_depth):
        raise RequestError(RpcError(INVALID_REQUEST, f"request nests deeper than {max_depth} levels"), req_id)
    if obj.get("jsonrpc") != JSONRPC:
        raise RequestError(RpcError(INVALID_REQUEST, 'missing or wrong "jsonrpc": must be "2.0"'), req_id)
    if "id" in obj and not _valid_id(raw_id):
        raise RequestError(
            RpcError(INVALID_REQUEST, f'"id" must be an integer or a string of at most {MAX_ID_LENGTH} characters'),
            None,
        )
    method = obj.get("method")
    if not isinstance(method, str):
        raise RequestError(RpcError(INVALID_REQUEST, '"method" must be a string'), req_id)
    extra = set(obj) - {"jsonrpc", "id", "method", "params"}
    if extra:
        raise RequestError(
            RpcError(INVALID_REQUEST, f"unknown member(s) in request: {', '.join(sorted(extra))}"), req_id
        )
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError(RpcError(INVALID_PARAMS, f'"params" must be an object, got {_type_name(params)}'), req_id)
    notification = "id" not in obj
    if method not in methods:
        shown = method if len(method) <= 64 else method[:64] + "..."
        raise RequestError(RpcError(METHOD_NOT_FOUND, f"method not found: {shown!r}"), req_id, notification)
    try:
        validate_params(method, params, methods)
    except RpcError as err:
        raise RequestError(err, req_id, notification) from None
    return Request(method=method, params=params, id=req_id, is_notification=notification)


class RequestError(Exception):
    """A request that cannot be dispatched, with the id its error response must carry.  A well-formed
    notification (no ``id``) with an unknown method or bad params gets no response at all (JSON-RPC 2.0)."""

    def __init__(self, error: RpcError, request_id: int | str | None, notification: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id
        self.notification = notification


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode_result(request_id: int | str | None, result: Any) -> str:
    return _dumps({"jsonrpc": JSONRPC, "id": request_id, "result": result})


def encode_error(request_id: int | str | None, error: RpcError) -> str:
    return _dumps({"jsonrpc": JSONRPC, "id": request_id, "error": error.to_json()})


def encode_event(event_type: str, payload: Any, session_id: str | None = None, seq: int | None = None) -> str:
    """An event built from Python values (gateway-originated events; small by construction)."""
    return _dumps(
        {
            "jsonrpc": JSONRPC,
            "method": "event",
            "params": {"type": event_type, "session_id": session_id, "seq": seq, "payload": payload},
        }
    )


#: Every event frame starts with these bytes; its ``params`` object follows, and one ``}`` ends the frame.
EVENT_PARAMS_AT = b'{"jsonrpc":"2.0","method":"event","params":'


def event_prefix(event_type: str, session_id: str) -> bytes:
    """The envelope of an event up to its ``seq``: the same for every event of one type in one session, so
    a session builds it once per type (:meth:`gateway.sessions.stream.EventStream.produce`).  Both go into
    JSON strings unescaped: the session id is the gateway's, and the stream checks that a worker's event
    type is a token first."""
    return b"".join(
        (
            EVENT_PARAMS_AT,
            b'{"type":"',
            event_type.encode("ascii"),
            b'","session_id":"',
            session_id.encode("ascii"),
            b'","seq":',
        )
    )


def wrap_event_after(prefix: bytes, seq: int, payload_json: bytes) -> bytes:
    """The event whose envelope up to ``seq`` is ``prefix`` (:func:`event_prefix`)."""
    return b"".join((prefix, b"%d" % seq, b',"payload":', payload_json, b"}}"))


def wrap_event(event_type: str, payload_json: bytes, session_id: str, seq: int) -> bytes:
    """The envelope around a worker's pre-encoded payload, built by concatenation: the payload is never
    decoded on the gateway's loop.  ``event_type`` and ``session_id`` are tokens (see :func:`event_prefix`)."""
    return wrap_event_after(event_prefix(event_type, session_id), seq, payload_json)


def valid_utf8(data: bytes) -> bytes:
    """``data`` if it is valid UTF-8, else with the bad sequences replaced (U+FFFD): a text frame must be
    valid UTF-8 and a worker's payload is untrusted.  ASCII (most events) is checked in one fast pass."""
    if data.isascii():
        return data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").encode("utf-8")
    return data


def text_bytes(text: str) -> bytes:
    """A frame the gateway built as ``str``, encoded once; an unpaired surrogate (from a peer's string that
    is not valid Unicode) costs that frame its bad characters (``?``), never the connection."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")
