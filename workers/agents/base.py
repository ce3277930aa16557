"""The Agent interface, and the turn handle through which an agent talks to its session.

An agent lives in a worker process, one per session.  It is built once with the session's options and
working directory (``factory(options, cwd)``; a class is such a factory), optionally ``start()``-ed, and
then called once per prompt with ``run_turn(text, turn)``.  Turns never overlap.  Everything an agent
emits goes through the :class:`TurnHandle`, which encodes events and scrubs tool output in this process,
so neither the agent nor the gateway can forget to.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from workers.scrub import MAX_CHUNK_BYTES, scrub_chunks

logger = logging.getLogger("worker_gateway.worker")

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

    State across workers (optional, both or neither): ``snapshot() -> JSON value`` is called after every
    turn and sent to the gateway before that turn's ``turn.complete``; ``restore(state)`` is called on a
    fresh worker of the same session with the last snapshot, before ``start()``.  A worker can die (an
    interrupt that had to kill it, a crash, a gateway restart): what the agent must not forget goes there.
    """

    def __init__(self, options: Mapping[str, Any], cwd: str) -> None:
        self.options = dict(options)
        self.cwd = cwd

    def start(self) -> None:
        """One-time set-up that may fail (connect, load a model...); runs before the session is ready."""

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        raise NotImplementedError

    # ``snapshot`` and ``restore`` are deliberately not defined here: the worker calls them only when an
    # agent defines them, so an agent without state costs nothing after each turn.


class TurnHandle:
    """The running turn, as seen by an agent: emit events and watch for cancellation.

    Thread-safe: an agent may emit from helper threads (subagents); frames are written whole.
    """

    def __init__(self, turn_id: Any, emit: Emit, cancel: threading.Event | None = None) -> None:
        self.turn_id = turn_id
        self._emit = emit
        self._cancel = cancel or threading.Event()
        self._subagent_ids = itertools.count(1)
        self._callbacks_lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._callback_ids = itertools.count(1)
        self.redactions = 0

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` as soon as this turn is cancelled, on the worker's control thread (at once if
        it already is).  For work that cannot poll :attr:`cancelled`: a blocked socket read is unblocked
        by shutting the socket down from here.  Keep it short and non-blocking; an exception it raises is
        logged and ignored.  Returns a function that unregisters the callback (call it once the blocking
        work is over, so a later cancel does not touch a socket that was reused)."""
        with self._callbacks_lock:
            key = next(self._callback_ids)
            self._callbacks[key] = callback
            run_now = self._cancel.is_set()
        if run_now:
            self._run_callback(callback)

        def unregister() -> None:
            with self._callbacks_lock:
                self._callbacks.pop(key, None)

        return unregister

    def cancel(self) -> None:
        """Mark the turn cancelled and run the registered cancel callbacks (called by the worker's control
        thread when the gateway sends ``cancel``; idempotent)."""
        with self._callbacks_lock:
            first = not self._cancel.is_set()
            self._cancel.set()
            callbacks = list(self._callbacks.values()) if first else []
        for callback in callbacks:
            self._run_callback(callback)

    @staticmethod
    def _run_callback(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            logger.exception("a cancel callback failed")

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

    def reasoning(self, text: str, **extra: Any) -> None:
        """A piece of the model's reasoning (``reasoning.delta``)."""
        self._emit("reasoning.delta", {"turn_id": self.turn_id, "text": text, **extra})

    def tool_call(self, call_id: str, name: str, arguments: Any, **extra: Any) -> None:
        """The agent decided to call a tool (``tool.call``); its output events carry the same ``call_id``."""
        self._emit(
            "tool.call", {"turn_id": self.turn_id, "call_id": call_id, "name": name, "arguments": arguments, **extra}
        )

    def tool_output(self, text: str, **extra: Any) -> int:
        """Tool output: scrubbed here, then sent as ``tool.output`` events of at most 64 KiB of text each,
        each carrying its ``redactions`` count.  ``extra`` fields (e.g. ``subagent_id``) are added to every
        event.  Returns the number of redactions."""
        return self.scrubbed_tool_output(text, **extra)[1]

    def scrubbed_tool_output(self, text: str, **extra: Any) -> tuple[str, int]:
        """As :meth:`tool_output`, returning ``(the scrubbed text as sent, redactions)``: what an agent may
        pass on (to a model) without leaking what the scrubber removed."""
        total = 0
        sent: list[str] = []
        for chunk, count in scrub_chunks(text, MAX_CHUNK_BYTES):
            payload = {"turn_id": self.turn_id, "text": chunk, "redactions": count}
            payload.update(extra)
            self._emit("tool.output", payload)
            sent.append(chunk)
            total += count
        self.redactions += total
        return "".join(sent), total

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
