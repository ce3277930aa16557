"""The Agent interface, and the turn handle through which an agent talks to its session.

An agent lives in a worker process, one per session.  It is built once with the session's options and
working directory (``factory(options, cwd)``; a class is such a factory), optionally ``start()``-ed, and
then called once per prompt with ``run_turn(text, turn)``.  Turns never overlap.  Everything an agent
emits goes through the :class:`TurnHandle`, which encodes events and scrubs tool output in this process,
so neither the agent nor the gateway can forget to.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from workers.scrub import MAX_CHUNK_BYTES, scrub_chunks

TurnStatus = Literal["ok", "error", "interrupted"]
Emit = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class TurnResult:
    """What ``run_turn`` may return instead of None (None means ``ok``, or ``interrupted`` if the turn was
    cancelled).  ``extra`` is merged into the ``turn.complete`` payload (e.g. ``exit_code``)."""

    status: TurnStatus = "ok"
    error: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class TurnCancelled(Exception):
    """Raised by :meth:`TurnHandle.check_cancelled`; the turn completes with status ``interrupted``."""


class Agent:
    """Base class for agents (subclassing is optional: any ``factory(options, cwd)`` returning an object
    with ``run_turn`` works; ``start`` is optional).

    There is no ``close``: a worker ends by a signal to its process group (session closed, gateway gone),
    so cleanup that matters must not depend on Python code running at exit.

    Raising from ``__init__`` or ``start`` fails the session's creation (error 5001, with the message);
    raising from ``run_turn`` completes that turn with status ``error`` and the worker keeps serving.
    """

    def __init__(self, options: Mapping[str, Any], cwd: str) -> None:
        self.options = dict(options)
        self.cwd = cwd

    def start(self) -> None:
        """One-time set-up that may fail (connect, load a model...); runs before the session is ready."""

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        raise NotImplementedError


class TurnHandle:
    """The running turn, as seen by an agent: emit events and watch for cancellation.

    Thread-safe: an agent may emit from helper threads (subagents); frames are written whole.
    """

    def __init__(self, turn_id: Any, emit: Emit, cancel: threading.Event | None = None) -> None:
        self.turn_id = turn_id
        self._emit = emit
        self._cancel = cancel or threading.Event()
        self._subagent_ids = itertools.count(1)
        self.redactions = 0

    @property
    def cancelled(self) -> bool:
        """True once the gateway asked this turn to stop; check it between units of work."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`TurnCancelled` if the turn was cancelled (a convenient early exit)."""
        if self._cancel.is_set():
            raise TurnCancelled()

    def wait_cancelled(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking at once on cancellation; True if cancelled."""
        return self._cancel.wait(timeout)

    def delta(self, text: str) -> None:
        """A piece of the agent's reply (``message.delta``)."""
        self._emit("message.delta", {"turn_id": self.turn_id, "text": text})

    def tool_output(self, text: str, **extra: Any) -> int:
        """Tool output: scrubbed here, then sent as ``tool.output`` events of at most 64 KiB of text each,
        each carrying its ``redactions`` count.  ``extra`` fields (e.g. ``subagent_id``) are added to every
        event.  Returns the number of redactions."""
        total = 0
        for chunk, count in scrub_chunks(text, MAX_CHUNK_BYTES):
            payload = {"turn_id": self.turn_id, "text": chunk, "redactions": count}
            payload.update(extra)
            self._emit("tool.output", payload)
            total += count
        self.redactions += total
        return total

    def subagent_start(self, subagent_id: str | None = None, **fields: Any) -> str:
        """Announce a nested subagent (``subagent.start``); returns its id (generated when not given)."""
        sid = subagent_id or f"{self.turn_id}.{next(self._subagent_ids)}"
        self._subagent_event("subagent.start", sid, fields)
        return sid

    def subagent_progress(self, subagent_id: str, **fields: Any) -> None:
        self._subagent_event("subagent.progress", subagent_id, fields)

    def subagent_complete(self, subagent_id: str, **fields: Any) -> None:
        self._subagent_event("subagent.complete", subagent_id, fields)

    def _subagent_event(self, event_type: str, subagent_id: str, fields: dict[str, Any]) -> None:
        payload = {"turn_id": self.turn_id, "subagent_id": subagent_id}
        payload.update(fields)
        self._emit(event_type, payload)
