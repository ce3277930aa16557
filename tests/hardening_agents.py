"""Misbehaving agents for the hardening tests, loaded in workers as ``hardening_agents:<Name>``.

The gateway under test is started with ``tests/`` on its ``PYTHONPATH``; the supervisor hands its
``sys.path`` to each worker, which imports this module there (never in the gateway).
"""

from __future__ import annotations

import os
import struct
from typing import Any

from workers.agents import Agent, TurnHandle, TurnResult

#: An event type that would close the envelope's JSON string and add a key of its own.
_INJECTING = b'x","injected":"1","y'
#: A type only the gateway sends, and its payload.
_GATEWAYS = b"session.closed"
_CLOSED = b'{"reason":"client"}'
#: Byte strings that are not a valid frame stream (workers/channel.py), by name.
CORRUPTIONS: dict[str, bytes] = {
    # length 5, kind 9 (only 1 and 2 exist)
    "bad_kind": struct.pack(">IBB", 5, 9, 3) + b"abc",
    # a header announcing a 1 GiB frame (over the 8 MiB limit)
    "oversize": struct.pack(">IBB", 1 << 30, 1, 3) + b"abc",
    # an event whose name is not ASCII
    "non_ascii_name": struct.pack(">IBB", 5, 1, 3) + b"\xff\xfe\xfd",
    # half a frame, then the worker exits: the stream ends inside a frame
    "truncated": struct.pack(">IBB", 100, 1, 3) + b"abc" + b"{",
    # a well-formed frame whose event type would break out of the envelope's JSON string
    "bad_event_type": struct.pack(">IBB", 2 + len(_INJECTING) + 2, 1, len(_INJECTING)) + _INJECTING + b"{}",
    # a well-formed event of a type only the gateway sends: the worker would speak for the gateway
    "gateway_event_type": struct.pack(">IBB", 2 + len(_GATEWAYS) + len(_CLOSED), 1, len(_GATEWAYS))
    + _GATEWAYS + _CLOSED,
}


def _write_fd(turn: TurnHandle) -> int:
    """The worker's end of the pipe to the gateway (reached through the turn's emit callback)."""
    session: Any = turn._emit.__self__  # workers.worker_main._Session
    return session._channel._write_fd


class CorruptFrame(Agent):
    """On a prompt naming one of :data:`CORRUPTIONS`, writes those bytes raw onto the pipe (after one good
    event), then either waits to be stopped or (``truncated``) exits.  Any other prompt is echoed."""

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        garbage = CORRUPTIONS.get(text.strip())
        if garbage is None:
            turn.delta(text)
            return None
        turn.delta("about to corrupt the stream")
        os.write(_write_fd(turn), garbage)
        if text.strip() == "truncated":
            os._exit(0)
        turn.wait_cancelled(120.0)  # the gateway must stop this worker; it never answers again
        return None


class BadState(Agent):
    """``save``: writes a CONTROL ``state`` frame whose value is not JSON (what a well-behaved worker can
    never send: its snapshot is encoded for it); ``die``: the worker exits.  Anything else is echoed."""

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        if text == "save":
            body = b'{"state":1,"agent":"shell"}'  # passes the gateway's cheap check, is not one JSON value
            os.write(_write_fd(turn), struct.pack(">IBB", 2 + 5 + len(body), 2, 5) + b"state" + body)
        elif text == "die":
            os._exit(3)
        turn.delta(text)
        return None
