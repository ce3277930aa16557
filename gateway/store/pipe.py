"""The store's pipe protocol: the operations between the gateway and its writer process, defined once.

This protocol *is* the store seam (ARCHITECTURE, "The two seams"): the SQLite writer speaks it, and a later
PostgreSQL writer is another process speaking it.  Frames use the project's one codec
(``workers/channel.py``).  Small requests are CONTROL frames with a JSON body; anything carrying already
encoded bytes (an event frame, an agent snapshot, a row read back) is an EVENT frame whose body is a small
binary header followed by the bytes untouched, so neither side ever decodes or re-encodes a payload.

Binary bodies (big-endian)::

    APPEND     u16 sid_len, sid, u64 seq, u8 type_len, type, frame
    PUT_STATE  u16 sid_len, sid, u64 through_seq, state
    ROW        u32 request id, u64 seq, frame          (one per event answering READ_EVENTS)
    STATE_ROW  u32 request id, state                   (answering GET_STATE when a state exists)

Every request that expects an answer carries an ``id``; the writer answers it with one RESULT
``{id, ok, value | error}`` after any ROW / STATE_ROW frames of that request.
"""

from __future__ import annotations

import enum
import struct

from workers.channel import Kind, encode_frame, frame_head


class StoreOp(enum.StrEnum):
    # gateway -> writer: writes (batched into the next group commit, in pipe order)
    CREATE_SESSION = "create_session"  #: {meta}
    UPDATE_SESSION = "update_session"  #: {session_id, fields}
    APPEND = "append"  #: EVENT, binary body (above)
    PUT_STATE = "put_state"  #: EVENT, binary body (above)
    # gateway -> writer: requests (answered after the writes before them are committed)
    GET_STATE = "get_state"  #: {id, session_id}
    READ_EVENTS = "read_events"  #: {id, session_id, after_seq, max_events, max_bytes}
    GET_SESSION = "get_session"  #: {id, session_id}: one stored session (or null), closed ones too
    LIST_SESSIONS = "list_sessions"  #: {id, limit, include_closed}
    RECOVER = "recover"  #: {id}
    DELETE_SESSION = "delete_session"  #: {id, session_id}
    CLAIM = "claim"  #: {id, gateway_id}: take ownership, answer the new fencing epoch
    CLOSE = "close"  #: {id}: commit what is queued, answer, exit
    # writer -> gateway
    READY = "ready"  #: {pid, path, sqlite_version}: the database is open
    OPEN_FAILED = "open_failed"  #: {kind: "corrupt" | "error", path, message}
    DURABLE = "durable"  #: {session_id: highest committed seq}, after every commit that held appends
    HEALTH = "health"  #: {reason: str | null}: writes fail (disk full, I/O error) / work again
    ROW = "row"  #: EVENT, binary body (above)
    STATE_ROW = "state_row"  #: EVENT, binary body (above)
    RESULT = "result"  #: {id, ok, value?, error?}


_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ROW = struct.Struct(">IQ")
_U32 = struct.Struct(">I")


def encode_append(session_id: str, seq: int, event_type: str, frame: bytes) -> bytes:
    return encode_append_head(session_id, seq, event_type, len(frame)) + frame


def encode_append_head(session_id: str, seq: int, event_type: str, frame_len: int) -> bytes:
    """Everything of :func:`encode_append`'s frame but the event bytes themselves, which follow it on the
    pipe unchanged (the gateway writes both without first joining them: no copy per event)."""
    sid = session_id.encode("utf-8")
    etype = event_type.encode("utf-8")
    if len(etype) > 255:
        raise ValueError(f"event type longer than 255 bytes: {event_type[:40]!r}")
    body_head = b"".join((_U16.pack(len(sid)), sid, _U64.pack(seq), bytes((len(etype),)), etype))
    return frame_head(Kind.EVENT, StoreOp.APPEND, len(body_head) + frame_len) + body_head


def decode_append(body: bytes) -> tuple[str, int, str, bytes]:
    (sid_len,) = _U16.unpack_from(body, 0)
    pos = 2 + sid_len
    sid = body[2:pos].decode("utf-8")
    (seq,) = _U64.unpack_from(body, pos)
    pos += 8
    type_len = body[pos]
    pos += 1
    etype = body[pos : pos + type_len].decode("utf-8")
    return sid, seq, etype, body[pos + type_len :]


def encode_put_state(session_id: str, through_seq: int, state: bytes) -> bytes:
    sid = session_id.encode("utf-8")
    body = b"".join((_U16.pack(len(sid)), sid, _U64.pack(through_seq), state))
    return encode_frame(Kind.EVENT, StoreOp.PUT_STATE, body)


def decode_put_state(body: bytes) -> tuple[str, int, bytes]:
    (sid_len,) = _U16.unpack_from(body, 0)
    pos = 2 + sid_len
    (through,) = _U64.unpack_from(body, pos)
    return body[2:pos].decode("utf-8"), through, body[pos + 8 :]


def encode_row(request_id: int, seq: int, frame: bytes) -> bytes:
    return encode_frame(Kind.EVENT, StoreOp.ROW, _ROW.pack(request_id, seq) + frame)


def decode_row(body: bytes) -> tuple[int, int, bytes]:
    request_id, seq = _ROW.unpack_from(body, 0)
    return request_id, seq, body[_ROW.size :]


def encode_state_row(request_id: int, state: bytes) -> bytes:
    return encode_frame(Kind.EVENT, StoreOp.STATE_ROW, _U32.pack(request_id) + state)


def decode_state_row(body: bytes) -> tuple[int, bytes]:
    (request_id,) = _U32.unpack_from(body, 0)
    return request_id, body[4:]
