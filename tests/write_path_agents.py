"""Agents for the write-path tests, loaded in workers as ``write_path_agents:<Name>`` (``tests/`` on the
gateway's ``PYTHONPATH``, as for ``hardening_agents``)."""

from __future__ import annotations

from typing import Any

from workers.agents import Agent, TurnHandle, TurnResult
from workers.channel import Kind, encode_frame

#: A ``message.delta`` payload that is not valid UTF-8 (a stray byte, a truncated sequence, an encoded
#: surrogate), around valid multi-byte text.
INVALID_PAYLOAD = b'{"text":"caf\xc3\xa9 \xff stray, \xe2\x9c cut, \xed\xa0\x80 surrogate, ok \xe2\x9c\x93"}'


class InvalidUtf8(Agent):
    """Writes one raw event whose payload is :data:`INVALID_PAYLOAD` (past the worker's encoder, as a
    buggy or hostile worker could), then a normal delta."""

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        session: Any = turn._emit.__self__  # workers.worker_main._Session
        session._channel.send(encode_frame(Kind.EVENT, "message.delta", INVALID_PAYLOAD))
        turn.delta("after")
        return None
