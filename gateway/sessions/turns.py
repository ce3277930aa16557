"""The turn queue of one session, and the only place that sets the session's status.  No I/O.

The registry asks it what to do (``take_next``: which prompt to send to the worker now) and tells it what
happened (``worker_ready``, ``turn_finished``, ``worker_lost``...); the queue answers with plain values.
"""

from __future__ import annotations

import collections
import enum
import itertools
from dataclasses import dataclass


class SessionStatus(enum.Enum):
    STARTING = "starting"  # waiting for a worker
    IDLE = "idle"  # worker ready, no turn running
    RUNNING = "running"  # a turn is running
    CLOSING = "closing"  # in the teardown funnel
    CLOSED = "closed"  # finalized: no longer listed


LIVE_STATUSES = (SessionStatus.STARTING, SessionStatus.IDLE, SessionStatus.RUNNING)


class QueueFull(Exception):
    """``prompt.submit`` while ``max_queued`` prompts already wait (JSON-RPC 4009)."""


@dataclass(frozen=True)
class Prompt:
    turn_id: str
    text: str


class TurnQueue:
    def __init__(self, session_id: str, max_queued: int, first_turn: int = 1) -> None:
        self._session_id = session_id
        self._max_queued = max_queued
        # A session restored from the store starts past every earlier turn number (turn ids stay unique
        # in its history: a client matching turn.complete by id never confuses a replayed one).
        self._ids = itertools.count(first_turn)
        self._queue: collections.deque[Prompt] = collections.deque()
        self.status = SessionStatus.STARTING
        self.current: str | None = None
        self.completed = 0

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    @property
    def busy(self) -> bool:
        """A turn runs or waits: a detached busy session outlives its grace period."""
        return self.current is not None or bool(self._queue)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, text: str) -> Prompt:
        """Queue a prompt; :meth:`take_next` says when it starts.  Raises :class:`QueueFull`."""
        waits = self.current is not None or self._queue or self.status is not SessionStatus.IDLE
        if waits and len(self._queue) >= self._max_queued:
            raise QueueFull(len(self._queue))
        prompt = Prompt(f"{self._session_id}.t{next(self._ids)}", text)
        self._queue.append(prompt)
        return prompt

    def take_next(self, worker_ready: bool) -> Prompt | None:
        """The prompt to send to the worker now, if one waits and the worker can take it."""
        if self.current is not None or not self._queue or not worker_ready or not self.live:
            return None
        prompt = self._queue.popleft()
        self.current = prompt.turn_id
        self.status = SessionStatus.RUNNING
        return prompt

    def drain(self) -> list[Prompt]:
        """Every waiting prompt, removed (they are failed: no worker will come for them)."""
        prompts = list(self._queue)
        self._queue.clear()
        return prompts

    def worker_starting(self) -> None:
        if self.live and self.current is None:
            self.status = SessionStatus.STARTING

    def worker_ready(self) -> None:
        if self.live and self.current is None:
            self.status = SessionStatus.IDLE

    def turn_started(self) -> None:
        """The worker announced ``turn.start``."""
        if self.live:
            self.status = SessionStatus.RUNNING

    def turn_finished(self) -> str | None:
        """``turn.complete`` went out: returns the turn that ended."""
        turn_id, self.current = self.current, None
        self.completed += 1
        if self.status is SessionStatus.RUNNING:
            self.status = SessionStatus.IDLE
        return turn_id

    def worker_lost(self) -> None:
        """The worker is gone (it died or was replaced); the running turn, if any, was completed."""
        if self.live:
            self.status = SessionStatus.IDLE

    def closing(self) -> None:
        self.status = SessionStatus.CLOSING

    def closed(self) -> None:
        self.status = SessionStatus.CLOSED
