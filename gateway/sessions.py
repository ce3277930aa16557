"""Sessions: ownership, the event stream with its ``seq``, prompts, interrupts, reapers, and the one
teardown funnel (PROTOCOL sections 4 and 5).

Event flow of a session::

    worker pipe --frames()--> _read_worker --_produce()--> ReplayBuffer --_pump()--> owner Connection

``_produce`` assigns the next ``seq`` and appends the encoded event to the replay buffer synchronously, so
events produced by the gateway itself (``worker.exited``, ``session.closed``...) and those relayed from the
worker share one gapless order.  ``_pump`` then delivers from the buffer while the owner has room; an
event leaves the buffer only after it reached the owner's socket (``ReplayBuffer.settle``).  The reader
stops pulling frames while too much is unsettled (slow or absent owner): the worker's pipe fills
and the worker blocks.  Nothing is dropped and memory is bounded by the replay buffer.

Every way a session ends (close, disconnect, grace expiry, idle TTL, shutdown) calls
:meth:`SessionRegistry.close`, which runs the teardown once and makes later callers wait for that result.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

from gateway import rpc
from gateway.connection import Connection
from gateway.replay import ReplayBuffer
from workers.channel import ChannelError, Kind, encode_json
from workers.supervisor import ExitStatus, Supervisor, UnknownAgentError, WorkerHandle, WorkerStartError

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.metrics import Metrics
    from gateway.slash import SlashRunner

logger = logging.getLogger("worker_gateway.sessions")

_EVENT_PREFIX = '{"jsonrpc":"2.0","method":"event","params":'
_YIELD_EVERY_BYTES = 256 * 1024


class SessionStatus(enum.Enum):
    STARTING = "starting"  # waiting for a worker
    IDLE = "idle"  # worker ready, no turn running
    RUNNING = "running"  # a turn is running
    CLOSING = "closing"  # in the teardown funnel
    CLOSED = "closed"  # finalized: no longer listed


_LIVE = (SessionStatus.STARTING, SessionStatus.IDLE, SessionStatus.RUNNING)


class Session:
    """One agent session.  Mutated only by :class:`SessionRegistry` on the event loop."""

    def __init__(self, session_id: str, agent: str, options: dict[str, Any], cwd: str, title: str,
                 close_on_disconnect: bool, config: Config) -> None:
        self.id = session_id
        self.agent = agent
        self.options = options
        self.cwd = cwd
        self.title = title
        self.close_on_disconnect = close_on_disconnect
        self.status = SessionStatus.STARTING
        self.created_at = time.time()
        self.created_mono = time.monotonic()
        self.last_active = time.time()
        self.last_active_mono = time.monotonic()
        self.owner: Connection | None = None
        self.detached_at: float | None = None  # monotonic
        self.worker: WorkerHandle | None = None
        self.reader: asyncio.Task[None] | None = None
        self.starter: asyncio.Task[None] | None = None
        self.slash: SlashRunner | None = None
        self.replay = ReplayBuffer(config.replay_max_events, config.replay_max_bytes)
        self.seq = 0
        self.delivered = 0  # last seq queued to the owner
        self.room = asyncio.Event()
        self.room.set()
        self.queue: collections.deque[tuple[str, str]] = collections.deque()
        self.current_turn: str | None = None
        self.turns_completed = 0
        self.turn_ended: dict[str, asyncio.Future[str]] = {}
        self.expected_exits: set[int] = set()
        self.reap_timer: asyncio.TimerHandle | None = None
        self.teardown: asyncio.Task[dict[str, Any]] | None = None
        self._turn_ids = itertools.count(1)

    @property
    def live(self) -> bool:
        return self.status in _LIVE

    @property
    def busy(self) -> bool:
        return self.current_turn is not None or bool(self.queue)

    def next_turn_id(self) -> str:
        return f"{self.id}.t{next(self._turn_ids)}"

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
        }

    def snapshot(self) -> dict[str, Any]:
        """What ``/status`` in the slash worker shows."""
        return {
            "session_id": self.id,
            "agent": self.agent,
            "title": self.title,
            "status": self.status.value,
            "worker_pid": self.worker.pid if self.worker else None,
            "uptime_s": round(time.monotonic() - self.created_mono, 3),
            "turns": self.turns_completed,
            "queued": len(self.queue),
            "last_seq": self.seq,
            "cwd": self.cwd,
        }


class SessionRegistry:
    def __init__(self, config: Config, supervisor: Supervisor, metrics: Metrics) -> None:
        self.config = config
        self.supervisor = supervisor
        self.metrics = metrics
        self._sessions: dict[str, Session] = {}

    # Queries -----------------------------------------------------------------------------------------
    @property
    def live_count(self) -> int:
        return sum(1 for s in self._sessions.values() if s.live)

    def count_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = collections.Counter(s.status.value for s in self._sessions.values())
        for status in _LIVE:
            counts.setdefault(status.value, 0)
        return dict(counts)

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or not session.live:
            raise rpc.RpcError(rpc.NOT_FOUND, f"session not found: {session_id!r} (closed, or never existed)",
                               {"session_id": session_id})
        return session

    def active_list(self) -> dict[str, Any]:
        return {"sessions": [s.summary() for s in self._sessions.values() if s.live]}

    # Creation ----------------------------------------------------------------------------------------
    async def create(self, conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
        agent = params.get("agent") or self.config.agent
        known = self.supervisor.known_agents()
        if ":" not in agent and agent not in known:
            raise rpc.RpcError(rpc.UNKNOWN_AGENT, f"unknown agent {agent!r}; available: {', '.join(known)} "
                               "(or name one as package.module:attr)", {"agent": agent})
        cwd = params.get("cwd") or os.getcwd()
        if not os.path.isdir(cwd):
            raise rpc.RpcError(rpc.INVALID_PARAMS, f"cwd is not an existing directory: {cwd!r}", {"param": "cwd"})
        if self.live_count >= self.config.max_sessions:
            raise rpc.RpcError(rpc.LIMIT_REACHED, f"session limit reached: max_sessions={self.config.max_sessions}",
                               {"limit": "max_sessions"})
        owned = sum(1 for sid in conn.sessions if sid in self._sessions and self._sessions[sid].live)
        if owned >= self.config.max_sessions_per_connection:
            raise rpc.RpcError(rpc.LIMIT_REACHED, "per-connection session limit reached: "
                               f"max_sessions_per_connection={self.config.max_sessions_per_connection}",
                               {"limit": "max_sessions_per_connection"})
        session = Session("s" + secrets.token_hex(8), agent, params.get("options") or {}, os.path.abspath(cwd),
                          params.get("title") or "", bool(params.get("close_on_disconnect", False)), self.config)
        self._sessions[session.id] = session
        self._attach(session, conn)
        if not conn.is_open:  # the owner left while we were validating
            await self.connection_lost(conn)
        started = time.monotonic()
        try:
            await self._start_worker(session)
        except rpc.RpcError:
            # The client never learned this session's id: end it without sending it events.
            if session.owner is not None:
                session.owner.remove_drain_listener(session.id)
                session.owner.sessions.discard(session.id)
                session.owner = None
            await self.close(session.id, "worker_died", missing_ok=True)
            raise
        if not session.live or session.worker is None:
            raise rpc.RpcError(rpc.NOT_FOUND, f"session {session.id} was closed while its worker was starting",
                               {"session_id": session.id})
        self.metrics.worker_start.observe(time.monotonic() - started)
        return {"session_id": session.id, "agent": session.agent, "worker_pid": session.worker.pid,
                "created_at": session.created_at}

    async def _start_worker(self, session: Session) -> None:
        """Give ``session`` a fresh worker; a worker that arrives after the session closed is stopped."""
        session.status = SessionStatus.STARTING
        try:
            handle = await self.supervisor.acquire(session.agent, session.options, session.cwd, session.id)
        except UnknownAgentError as exc:
            raise rpc.RpcError(rpc.UNKNOWN_AGENT, str(exc), {"agent": session.agent}) from None
        except WorkerStartError as exc:
            raise rpc.RpcError(rpc.WORKER_START_FAILED, f"worker failed to start: {exc}") from None
        if not session.live:  # closed meanwhile (the create/close race): never attach
            await handle.stop()
            return
        session.worker = handle
        session.reader = asyncio.get_running_loop().create_task(self._read_worker(session, handle),
                                                                name=f"reader-{session.id}")
        session.status = SessionStatus.IDLE
        self._next_prompt(session)

    def _ensure_worker(self, session: Session) -> None:
        """Start a replacement worker in the background (after a death or an interrupt)."""
        if session.worker is not None or (session.starter is not None and not session.starter.done()):
            return

        async def start() -> None:
            try:
                await self._start_worker(session)
            except rpc.RpcError as err:
                # Fail every queued prompt rather than leaving them waiting for a worker that won't come.
                session.status = SessionStatus.IDLE
                while session.queue:
                    turn_id, text = session.queue.popleft()
                    self._emit(session, "turn.start", {"turn_id": turn_id, "text": text})
                    self._emit(session, "turn.complete", {"turn_id": turn_id, "status": "error", "error": err.message})

        session.starter = asyncio.get_running_loop().create_task(start(), name=f"starter-{session.id}")

    # Ownership -----------------------------------------------------------------------------------------
    def _attach(self, session: Session, conn: Connection) -> None:
        previous = session.owner
        if previous is not None and previous is not conn:
            previous.sessions.discard(session.id)
            previous.remove_drain_listener(session.id)
            previous.send(rpc.encode_event("session.detached", {"reason": "superseded"}, session.id, None))
        session.owner = conn
        session.detached_at = None
        conn.sessions.add(session.id)
        conn.add_drain_listener(session.id, lambda: self._pump(session))
        if session.reap_timer is not None:
            session.reap_timer.cancel()
            session.reap_timer = None

    def _detach(self, session: Session) -> None:
        if session.owner is not None:
            session.owner.remove_drain_listener(session.id)
            session.owner.sessions.discard(session.id)
        session.owner = None
        session.detached_at = time.monotonic()
        self._schedule_reap(session)

    async def connection_lost(self, conn: Connection) -> None:
        """The owner went away: close ``close_on_disconnect`` sessions, detach the others for the grace."""
        closing = []
        for session_id in list(conn.sessions):
            session = self._sessions.get(session_id)
            if session is None or session.owner is not conn:
                continue
            if session.close_on_disconnect:
                closing.append(self.close(session.id, "disconnect", missing_ok=True))
            else:
                self._detach(session)
        conn.sessions.clear()
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)

    def resume(self, conn: Connection, request_id: int | str | None, params: dict[str, Any]) -> Callable[[], None]:
        """Re-attach to ``conn``.  Returns the sender that emits the response, then the replay, in one
        synchronous step, so no live event can slip between them."""
        session = self.get(params["session_id"])
        after = max(0, params.get("after_seq", 0))
        if after > session.seq:
            raise rpc.RpcError(rpc.INVALID_PARAMS,
                               f"after_seq {after} is beyond the session's last seq {session.seq}",
                               {"param": "after_seq"})

        def send() -> None:
            if not session.live:
                conn.send(rpc.encode_error(request_id, rpc.RpcError(rpc.NOT_FOUND, f"session {session.id} closed")))
                return
            self._attach(session, conn)
            session.touch()
            held = session.replay.since(after)
            conn.send(rpc.encode_result(request_id, {
                "session_id": session.id, "status": session.status.value, "last_seq": session.seq,
                "replayed": len(held.frames), "truncated": held.truncated}))
            if held.truncated:
                conn.send(rpc.encode_event("replay.truncated", {"first_seq": held.first_seq}, session.id, None))
            for seq, frame in enumerate(held.frames, session.seq - len(held.frames) + 1):
                conn.send(frame, self._settler(session, conn, seq))
            session.delivered = session.seq

        return send

    def events_since_text(self, request_id: int | str | None, params: dict[str, Any]) -> str:
        """The response to ``session.events.since``, built by concatenation: the buffered events already
        hold their encoded payloads, which are never decoded on the loop."""
        session = self.get(params["session_id"])
        held = session.replay.since(params["after_seq"])
        events = ",".join(frame[len(_EVENT_PREFIX):-1] for frame in held.frames)
        return ('{"jsonrpc":"2.0","id":' + encode_json(request_id).decode() + ',"result":{"events":[' + events +
                '],"last_seq":' + str(session.seq) + ',"truncated":' + ("true" if held.truncated else "false") + "}}")

    # The event stream ------------------------------------------------------------------------------------
    def _emit(self, session: Session, event_type: str, payload: dict[str, Any]) -> None:
        self._produce(session, event_type, encode_json(payload))

    def _produce(self, session: Session, event_type: str, payload_json: bytes) -> None:
        session.seq += 1
        text = rpc.wrap_event(event_type, payload_json, session.id, session.seq).decode("utf-8", "replace")
        session.replay.append(session.seq, text)
        session.touch()
        self.metrics.events_relayed.inc()
        self.metrics.bytes_relayed.inc(len(text))
        if event_type == "turn.start":
            session.status = SessionStatus.RUNNING
        elif event_type == "turn.complete":
            self.metrics.turn_completed(payload_json)
            self._turn_finished(session)
        self._pump(session)

    def _pump(self, session: Session) -> None:
        """Queue undelivered events to the owner while it has room."""
        owner = session.owner
        if owner is not None and owner.is_open:
            replay = session.replay
            while session.delivered < session.seq and owner.has_room:
                seq = session.delivered + 1
                frame = replay.get(seq)
                if frame is None:  # evicted before delivery: tell the client instead of leaving a silent gap
                    owner.send(rpc.encode_event("replay.truncated", {"first_seq": replay.first_seq}, session.id, None))
                    session.delivered = replay.first_seq - 1
                    continue
                owner.send(frame, self._settler(session, owner, seq))
                session.delivered = seq

    def _settler(self, session: Session, conn: Connection, seq: int) -> Callable[[], None]:
        """What the connection calls once event ``seq`` reached its socket."""

        def settled() -> None:
            if session.owner is conn:  # a superseded owner's sends say nothing about the new owner
                session.replay.settle(seq)
                if self._has_room(session):
                    session.room.set()

        return settled

    def _has_room(self, session: Session) -> bool:
        """Whether the reader may take another frame from the worker: unsettled events are bounded."""
        replay = session.replay
        return (replay.unsettled_count < self.config.replay_max_events // 2
                and replay.unsettled_bytes < self.config.replay_max_bytes // 2)

    async def _read_worker(self, session: Session, handle: WorkerHandle) -> None:
        corrupt: str | None = None
        since_yield = 0
        try:
            async for frame in handle.frames():
                if frame.kind is not Kind.EVENT:
                    continue
                since_yield += len(frame.body)
                if since_yield >= _YIELD_EVERY_BYTES:
                    # frames() returns queued frames without suspending: give other sessions and the
                    # pings a turn instead of relaying a whole backlog in one go.
                    since_yield = 0
                    await asyncio.sleep(0)
                while not self._has_room(session) and handle is session.worker:
                    session.room.clear()
                    await session.room.wait()
                if handle is not session.worker:
                    break
                self._produce(session, frame.name, frame.body)
        except ChannelError as exc:
            corrupt = str(exc)
            logger.warning("session %s: corrupt frame from worker %s: %s", session.id, handle.pid, exc)
        if handle.pid in session.expected_exits:
            return
        # EOF or garbage without us asking: the worker is dying or broken; make sure its group is gone.
        status = await handle.stop()
        if handle.pid in session.expected_exits or handle is not session.worker:
            return
        self._worker_died(session, status, corrupt)

    def _worker_died(self, session: Session, status: ExitStatus, reason: str | None) -> None:
        session.worker = None
        self.metrics.worker_exits.labels(expected="false").inc()
        self._emit(session, "worker.exited", {"pid": status.pid, "returncode": status.returncode,
                                              "signal": status.signal, "expected": False})
        if session.current_turn is not None:
            what = reason or (f"killed by signal {status.signal}" if status.signal else f"exit status {status.returncode}")
            self._emit(session, "turn.complete", {"turn_id": session.current_turn, "status": "error",
                                                  "error": f"worker died: {what}"})
        session.status = SessionStatus.IDLE
        if session.queue:
            self._ensure_worker(session)

    # Turns ---------------------------------------------------------------------------------------------
    def submit(self, session_id: str, text: str) -> dict[str, Any]:
        session = self.get(session_id)
        turn_id = session.next_turn_id()
        if session.current_turn is None and not session.queue and session.worker is not None \
                and session.status is SessionStatus.IDLE:
            self._start_turn(session, turn_id, text)
            return {"status": "started", "turn_id": turn_id}
        if len(session.queue) >= self.config.max_queued_prompts:
            raise rpc.RpcError(rpc.BUSY, f"prompt queue full: {len(session.queue)} prompts already wait "
                               f"(max_queued_prompts={self.config.max_queued_prompts}); retry after a turn completes",
                               {"limit": "max_queued_prompts"})
        session.queue.append((turn_id, text))
        session.touch()
        if session.worker is None:
            self._ensure_worker(session)
        return {"status": "queued", "turn_id": turn_id}

    def _start_turn(self, session: Session, turn_id: str, text: str) -> None:
        assert session.worker is not None
        session.current_turn = turn_id
        session.status = SessionStatus.RUNNING
        session.turn_ended[turn_id] = asyncio.get_running_loop().create_future()
        session.touch()
        session.worker.send("prompt", {"turn_id": turn_id, "text": text})

    def _turn_finished(self, session: Session) -> None:
        turn_id = session.current_turn
        session.current_turn = None
        session.turns_completed += 1
        if turn_id is not None:
            future = session.turn_ended.pop(turn_id, None)
            if future is not None and not future.done():
                future.set_result(turn_id)
        if session.status is SessionStatus.RUNNING:
            session.status = SessionStatus.IDLE
        if session.live:
            self._next_prompt(session)
            if session.owner is None and not session.busy:
                self._schedule_reap(session)

    def _next_prompt(self, session: Session) -> None:
        if session.current_turn is None and session.queue and session.worker is not None and session.live:
            turn_id, text = session.queue.popleft()
            self._start_turn(session, turn_id, text)

    async def interrupt(self, session_id: str) -> dict[str, Any]:
        session = self.get(session_id)
        turn_id = session.current_turn
        if turn_id is None or session.worker is None:
            return {"status": "not_running"}
        ended = session.turn_ended[turn_id]
        session.worker.send("cancel", {"turn_id": turn_id})
        try:
            await asyncio.wait_for(asyncio.shield(ended), self.config.interrupt_grace_s)
        except asyncio.TimeoutError:
            if session.current_turn == turn_id and session.live:
                await self._replace_worker(session, turn_id)
        return {"status": "interrupted"}

    async def _replace_worker(self, session: Session, turn_id: str) -> None:
        """The turn ignored the cancel (e.g. stuck in C code holding the GIL): kill the group, finish the
        turn as interrupted, and start a fresh worker so the session stays usable."""
        handle = session.worker
        assert handle is not None
        session.expected_exits.add(handle.pid)
        session.worker = None
        session.room.set()  # release a reader waiting for room so it sees the handle is stale
        status = await handle.stop()
        reader = session.reader
        if reader is not None:
            await asyncio.wait([reader], timeout=1.0)
            reader.cancel()
        self.metrics.worker_exits.labels(expected="true").inc()
        self._emit(session, "worker.exited", {"pid": status.pid, "returncode": status.returncode,
                                              "signal": status.signal, "expected": True})
        if session.current_turn == turn_id:
            self._emit(session, "turn.complete", {"turn_id": turn_id, "status": "interrupted"})
        if session.live:
            self._ensure_worker(session)

    # Slash commands ------------------------------------------------------------------------------------
    async def slash_exec(self, session_id: str, command: str) -> dict[str, Any]:
        from gateway.slash import SlashRunner

        session = self.get(session_id)
        if session.slash is None:
            session.slash = SlashRunner(self.config, session.cwd)
        session.touch()
        return await session.slash.exec(command, session.snapshot())

    # Reaping -------------------------------------------------------------------------------------------
    def _schedule_reap(self, session: Session) -> None:
        """Arm one timer for the next deadline of a detached session: grace end or idle TTL."""
        if session.reap_timer is not None:
            session.reap_timer.cancel()
            session.reap_timer = None
        if session.owner is not None or not session.live or session.detached_at is None:
            return
        now = time.monotonic()
        deadlines = [session.last_active_mono + self.config.idle_ttl_s]
        grace_end = session.detached_at + self.config.grace_s
        if self.config.grace_s > 0:
            if now >= grace_end and not session.busy:
                self._spawn_close(session, "grace_expired")
                return
            if now < grace_end:
                deadlines.append(grace_end)
        if now >= deadlines[0]:
            self._spawn_close(session, "idle_timeout")
            return
        delay = max(0.0, min(deadlines) - now) + 0.001
        session.reap_timer = asyncio.get_running_loop().call_later(delay, self._schedule_reap, session)

    def _spawn_close(self, session: Session, reason: str) -> None:
        asyncio.get_running_loop().create_task(self.close(session.id, reason, missing_ok=True),
                                               name=f"reap-{session.id}")

    # The teardown funnel --------------------------------------------------------------------------------
    async def close(self, session_id: str, reason: str, missing_ok: bool = False) -> dict[str, Any]:
        """End a session: every path comes here.  Idempotent: a second call waits for the first."""
        session = self._sessions.get(session_id)
        if session is None:
            if missing_ok:
                return {"closed": True}
            raise rpc.RpcError(rpc.NOT_FOUND, f"session not found: {session_id!r}", {"session_id": session_id})
        if session.teardown is None:
            session.teardown = asyncio.get_running_loop().create_task(self._teardown(session, reason),
                                                                      name=f"teardown-{session.id}")
        return await asyncio.shield(session.teardown)

    async def _teardown(self, session: Session, reason: str) -> dict[str, Any]:
        started = time.monotonic()
        session.status = SessionStatus.CLOSING
        if session.reap_timer is not None:
            session.reap_timer.cancel()
            session.reap_timer = None
        handle, session.worker = session.worker, None
        session.room.set()
        stops: list[Any] = []
        if handle is not None:
            session.expected_exits.add(handle.pid)
            stops.append(handle.stop())
        if session.slash is not None:
            stops.append(session.slash.close())
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.error("session %s: teardown step failed: %r", session.id, result)
        for task in (session.reader, session.starter):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        for future in session.turn_ended.values():
            if not future.done():
                future.set_result("closed")  # an interrupt waiting on the turn gets its answer
        if handle is not None and isinstance(results[0], ExitStatus):
            status = results[0]
            self._emit(session, "worker.exited", {"pid": status.pid, "returncode": status.returncode,
                                                  "signal": status.signal, "expected": True})
        self._emit(session, "session.closed", {"reason": reason})
        session.status = SessionStatus.CLOSED
        if session.owner is not None:
            session.owner.remove_drain_listener(session.id)
            session.owner.sessions.discard(session.id)
        self._sessions.pop(session.id, None)
        self.metrics.reaps.labels(reason=reason).inc()
        self.metrics.teardown.observe(time.monotonic() - started)
        return {"closed": True}

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(self.close(sid, reason, missing_ok=True) for sid in list(self._sessions)),
                             return_exceptions=True)
