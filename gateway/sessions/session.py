"""One session's state: who owns it, its stream, its turns, its worker slot.  Mutated only by the registry."""

from __future__ import annotations

import asyncio
import enum
import time
from typing import TYPE_CHECKING, Any

from gateway.sessions.stream import EventStream
from gateway.sessions.turns import SessionStatus, TurnQueue

if TYPE_CHECKING:
    from gateway.connection import Connection
    from gateway.slash import SlashRunner
    from workers.backends import Worker


class SlotState(enum.Enum):
    NONE = "none"  # no worker: the next prompt starts one
    STARTING = "starting"  # a worker is being acquired
    READY = "ready"  # a worker takes prompts; its reader relays its frames
    STOPPING = "stopping"  # the worker is being ended (teardown or replacement)


class WorkerSlot:
    """The session's one worker and the tasks that serve it, with one explicit state.

    A worker that is no longer :attr:`worker` (replaced, or being stopped) is *stale*: its reader stops, and
    its exit is expected, so the registry never reports it as a death.
    """

    def __init__(self) -> None:
        self.state = SlotState.NONE
        self.worker: Worker | None = None
        self.reader: asyncio.Task[None] | None = None
        self.starter: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.state is SlotState.READY

    def is_current(self, worker: Worker) -> bool:
        return self.worker is worker and self.state is SlotState.READY

    def starting(self, task: asyncio.Task[None] | None) -> None:
        self.state = SlotState.STARTING
        self.starter = task

    def attach(self, worker: Worker, reader: asyncio.Task[None]) -> None:
        self.state = SlotState.READY
        self.worker = worker
        self.reader = reader
        self.starter = None

    def release(self) -> Worker | None:
        """Take the worker out (to stop it); the slot is STOPPING until :meth:`empty`."""
        worker, self.worker = self.worker, None
        self.state = SlotState.STOPPING if worker is not None else SlotState.NONE
        return worker

    def empty(self) -> None:
        self.state = SlotState.NONE
        self.worker = None
        self.starter = None


class Session:
    def __init__(
        self,
        session_id: str,
        agent: str,
        options: dict[str, Any],
        cwd: str,
        title: str,
        close_on_disconnect: bool,
        stream: EventStream,
        max_queued_prompts: int,
    ) -> None:
        # Restored sessions (stream.seq > 0) number their turns after every seq so far: each earlier turn
        # used at least one seq, so no id repeats.
        self.id = session_id
        self.agent = agent
        self.options = options
        self.cwd = cwd
        self.title = title
        self.close_on_disconnect = close_on_disconnect
        self.stream = stream
        self.turns = TurnQueue(session_id, max_queued_prompts, first_turn=stream.seq + 1)
        self.slot = WorkerSlot()
        self.created_at = time.time()
        self.created_mono = time.monotonic()
        self.last_active = time.time()
        self.last_active_mono = time.monotonic()
        self.owner: Connection | None = None
        self.detached_at: float | None = None  # monotonic
        self.blocked_since: float | None = None  # monotonic: the reader waits for room since
        self.slash: SlashRunner | None = None
        self.agent_state: bytes | None = None  # the agent's last snapshot (encoded JSON)
        self.restored = False  # came back from the store: its saved state is read before the next worker
        self.detached_bytes = 0  # event bytes produced since the owner left (the store's detached quota)
        self.backfill: asyncio.Task[None] | None = None  # delivering from disk what the cache forgot
        self.room = asyncio.Event()
        self.room.set()
        self.durable = asyncio.Event()  # set when the store reports a commit of this session's events
        self.turn_ended: dict[str, asyncio.Future[str]] = {}
        self.reap_timer: asyncio.TimerHandle | None = None
        self.teardown: asyncio.Task[dict[str, Any]] | None = None

    @property
    def status(self) -> SessionStatus:
        return self.turns.status

    @property
    def live(self) -> bool:
        return self.turns.live

    @property
    def seq(self) -> int:
        return self.stream.seq

    def touch(self) -> None:
        self.last_active = time.time()
        self.last_active_mono = time.monotonic()

    def summary(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "agent": self.agent,
            "title": self.title,
            "status": self.status.value,
            "attached": self.owner is not None,
            "created_at": self.created_at,
            "last_active": self.last_active,
            "last_seq": self.seq,
            **({"node": w.node} if (w := self.slot.worker) is not None and w.node else {}),
        }

    def snapshot(self) -> dict[str, Any]:
        """What ``/status`` in the slash worker shows."""
        worker = self.slot.worker
        return {
            "session_id": self.id,
            "agent": self.agent,
            "title": self.title,
            "status": self.status.value,
            "worker_pid": worker.pid if worker is not None else None,
            "uptime_s": round(time.monotonic() - self.created_mono, 3),
            "turns": self.turns.completed,
            "running_turn": self.turns.current,
            "queued": self.turns.queued,
            "last_seq": self.seq,
            "cwd": self.cwd,
        }
