"""The asyncio shell around the session core: it feeds the pure parts (stream, turns, reaping) and does the
I/O they ask for (PROTOCOL sections 4 and 5).

Event flow of a session::

    worker frames --_read_worker--> EventStream.produce --> EventLog --_pump--> owner Connection

The reader stops pulling frames while too much is unsettled (slow or absent owner): the worker's pipe
fills and the worker blocks.  Nothing is dropped and memory is bounded by the log's bounds.

Every way a session ends (close, disconnect, grace expiry, idle TTL, blocked, shutdown) calls
:meth:`SessionRegistry.close`, which runs the teardown once and makes later callers wait for that result.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from gateway import rpc
from gateway.connection import Connection
from gateway.sessions.reaping import ReapInputs, reap_decision
from gateway.sessions.session import Session, SlotState
from gateway.sessions.stream import EventStream, Gap, InvalidEventType, OnDisk
from gateway.sessions.turns import LIVE_STATUSES, QueueFull, SessionStatus
from gateway.store.durable import DurableEventLog
from gateway.store.errors import StoreError
from gateway.store.memory import MemoryEventLog
from gateway.wire import WORKER_EVENT_TYPES, CloseReason, ErrorCode, EventType, TurnStatus
from workers.backends import ExitStatus, SavedStateError, UnknownAgentError, Worker, WorkerBackend, WorkerStartError
from workers.channel import ChannelError, Frame, Kind, LoopReads, encode_json
from workers.ops import Op

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.metrics import Metrics
    from gateway.store.client import EventStore

logger = logging.getLogger("worker_gateway.sessions")

_YIELD_EVERY_BYTES = 256 * 1024
#: The events that move a session's turn queue: relayed one at a time, never inside a run.
_TURN_EDGES = frozenset({EventType.TURN_START, EventType.TURN_COMPLETE})
#: Closed sessions whose last events still travel to their owner are kept (for events.since) this long.
_DRAIN_KEEP_S = 60.0
#: Closed sessions listed by session.list when there is no store.
_CLOSED_KEPT = 1000
#: Bytes queued to the store but not yet committed, over all sessions, before readers pause.
_STORE_PENDING_MAX = 32 * 1024 * 1024
#: One piece of a read from disk (a resume older than the cache, an events.since page).
_DISK_PIECE_EVENTS = 1024
_DISK_PIECE_BYTES = 1024 * 1024
#: Option keys whose values are secrets (the openai agent's key and proxy headers): never stored.
_SECRET_OPTIONS = frozenset({"api_key", "headers"})
_LIST_FIELDS = ("session_id", "agent", "title", "status", "created_at", "last_active", "last_seq", "closed_reason")


class SessionRegistry:
    def __init__(
        self, config: Config, backend: WorkerBackend, metrics: Metrics, store: EventStore | None = None
    ) -> None:
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.store = store
        self._sessions: dict[str, Session] = {}
        #: Finalized sessions whose owner has not received every event yet (PROTOCOL: nothing is lost).
        self._draining: dict[str, Session] = {}
        #: Summaries of closed sessions, newest last (in memory: bounded by ``_CLOSED_KEPT``).
        self._closed: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    # Queries -----------------------------------------------------------------------------------------
    @property
    def live_count(self) -> int:
        return sum(1 for s in self._sessions.values() if s.live)

    def count_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = collections.Counter(s.status.value for s in self._sessions.values())
        for status in LIVE_STATUSES:
            counts.setdefault(status.value, 0)
        return dict(counts)

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or not session.live:
            raise _not_found(session_id)
        return session

    def _readable(self, session_id: str) -> Session:
        """A live session, or a closed one whose last events are still on their way to its owner."""
        session = self._sessions.get(session_id) or self._draining.get(session_id)
        if session is None:
            raise _not_found(session_id)
        return session

    def _session_limit(self) -> rpc.RpcError:
        return rpc.RpcError(
            ErrorCode.LIMIT_REACHED,
            f"session limit reached: max_sessions={self.config.max_sessions}",
            {"limit": "max_sessions"},
        )

    def active_list(self) -> dict[str, Any]:
        return {"sessions": [s.summary() for s in self._sessions.values() if s.live]}

    # The store -------------------------------------------------------------------------------------------
    def _new_stream(self, session_id: str, last_seq: int = 0) -> EventStream:
        config = self.config
        log: MemoryEventLog | DurableEventLog
        if self.store is not None:
            log = DurableEventLog(
                session_id,
                self.store,
                max_events=config.replay_max_events,
                max_bytes=config.replay_max_bytes,
                last_seq=last_seq,
            )
        else:
            log = MemoryEventLog(config.replay_max_events, config.replay_max_bytes, first_seq=last_seq + 1)
        return EventStream(
            session_id,
            log,
            reader_max_events=config.replay_max_events // 2,
            reader_max_bytes=config.replay_max_bytes // 2,
            seq=last_seq,
        )

    def _store_update(self, session: Session, **fields: Any) -> None:
        if self.store is None:
            return
        try:
            self.store.update_session(session.id, last_active=session.last_active, **fields)
        except StoreError as exc:
            logger.warning("session %s: store update failed: %s", session.id, exc)

    def on_durable(self, durable: dict[str, int]) -> None:
        """The store committed events: deliver them, and let readers that waited on the store go on."""
        for session_id, seq in durable.items():
            session = self._sessions.get(session_id) or self._draining.get(session_id)
            if session is not None and isinstance(session.stream.log, DurableEventLog):
                session.stream.log.mark_durable(seq)
                self._pump(session)
                session.durable.set()
        for session in self._sessions.values():
            if not session.room.is_set() and self._reader_has_room(session):
                session.room.set()

    async def _until_delivered(self, session: Session, timeout: float = 10.0) -> None:
        """Until every event produced so far is durable and queued to the owner, so that a response sent
        next follows them (``session.close`` after ``session.closed``, as without a store)."""
        log = session.stream.log
        if not log.persistent:
            return
        target = session.seq
        deadline = time.monotonic() + timeout
        while log.durable_seq < target and self.store_health is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            session.durable.clear()
            try:
                await asyncio.wait_for(session.durable.wait(), remaining)
            except TimeoutError:
                return

    @property
    def store_health(self) -> str | None:
        return self.store.health if self.store is not None else None

    def _require_store_health(self) -> None:
        reason = self.store_health
        if reason is not None:
            raise rpc.RpcError(ErrorCode.STORE_UNAVAILABLE, f"session store unavailable: {reason}", {"reason": reason})

    async def recover(self) -> None:
        """At start: bring back every session that was live when the last run ended (PROTOCOL section 8)."""
        if self.store is None:
            return
        for row in await self.store.recover():
            session = self._session_from_row(row)
            self._sessions[session.id] = session
            if row.get("turn_running"):
                turn_id = await self._running_turn_id(session)
                self._emit(
                    session,
                    EventType.WORKER_EXITED,
                    {"pid": row.get("worker_pid"), "returncode": None, "signal": None, "expected": False},
                )
                self._emit(
                    session,
                    EventType.TURN_COMPLETE,
                    {"turn_id": turn_id, "status": TurnStatus.ERROR, "error": "gateway restarted"},
                )
            self._store_update(session, status=session.status.value)
            if session.close_on_disconnect:
                self._spawn_close(session, CloseReason.DISCONNECT)
            else:
                session.detached_at = time.monotonic()
                self._schedule_reap(session)

    def _session_from_row(self, row: dict[str, Any]) -> Session:
        session = Session(
            row["session_id"],
            row.get("agent") or self.config.agent,
            row.get("options") or {},
            row.get("cwd") or os.getcwd(),
            row.get("title") or "",
            bool(row.get("close_on_disconnect", False)),
            self._new_stream(row["session_id"], int(row["last_seq"])),
            self.config.max_queued_prompts,
        )
        session.created_at = float(row.get("created_at") or time.time())
        session.last_active = float(row.get("last_active") or time.time())
        session.restored = True
        session.turns.worker_lost()  # idle: the next prompt starts a worker, which gets the saved state
        return session

    async def _running_turn_id(self, session: Session) -> str | None:
        """The turn a crash interrupted: its ``turn.start`` is among the session's last events."""
        assert self.store is not None
        rows = await self.store.read_events(
            session.id, max(0, session.seq - 512), max_events=512, max_bytes=8 * 1024 * 1024
        )
        for _, frame in reversed(rows):
            if b'"type":"turn.start"' in frame[:80]:
                try:
                    return json.loads(frame)["params"]["payload"]["turn_id"]
                except (ValueError, KeyError, TypeError):
                    return None
        return None

    async def _reopen(self, session_id: str) -> Session | None:
        """A stored closed session comes back on ``session.resume`` (status idle, no worker yet)."""
        if self.store is None:
            return None
        row = await self.store.get_session(session_id)
        if row is None or session_id in self._sessions:
            return self._sessions.get(session_id)
        self._require_store_health()
        if self.live_count >= self.config.max_sessions:
            raise self._session_limit()
        self._draining.pop(session_id, None)
        session = self._session_from_row(row)
        self._sessions[session.id] = session
        self._store_update(session, status=session.status.value)
        return session

    async def list_stored(self, limit: int, include_closed: bool) -> dict[str, Any]:
        """``session.list``: stored (or, without a store, remembered) sessions, newest activity first;
        live ones as they are now."""
        if limit < 0:
            raise rpc.RpcError(ErrorCode.INVALID_PARAMS, f"limit must be >= 0, got {limit}", {"param": "limit"})
        rows: dict[str, dict[str, Any]] = {}
        if self.store is not None:
            try:
                stored = await self.store.list_sessions(
                    limit=limit + len(self._sessions), include_closed=include_closed
                )
            except StoreError as exc:
                raise rpc.RpcError(ErrorCode.STORE_UNAVAILABLE, f"session store unavailable: {exc}") from None
            for row in stored:
                rows[row["session_id"]] = {key: row.get(key) for key in _LIST_FIELDS}
        elif include_closed:
            rows.update((sid, dict(row)) for sid, row in self._closed.items())
        for session in self._sessions.values():
            if session.live:
                row = session.summary()
                del row["attached"]
                rows[session.id] = {**row, "closed_reason": None}
        ordered = sorted(rows.values(), key=lambda row: row.get("last_active") or 0, reverse=True)
        return {"sessions": ordered[:limit]}

    async def delete(self, session_id: str) -> dict[str, Any]:
        """``session.delete``: close it if live, then remove it and its events."""
        known = session_id in self._sessions or session_id in self._closed or session_id in self._draining
        if session_id in self._sessions:
            await self.close(session_id, CloseReason.DELETED)
        if self.store is not None:
            try:
                known = await self.store.delete_session(session_id) or known
            except StoreError as exc:
                raise rpc.RpcError(ErrorCode.STORE_UNAVAILABLE, f"session store unavailable: {exc}") from None
        if not known:
            raise rpc.RpcError(ErrorCode.NOT_FOUND, f"session not found: {session_id!r}", {"session_id": session_id})
        self._closed.pop(session_id, None)
        draining = self._draining.pop(session_id, None)
        if draining is not None:
            self._disown(draining)
        return {"deleted": True}

    # Creation ----------------------------------------------------------------------------------------
    async def create(self, conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        agent = params.get("agent") or config.agent
        known = self.backend.known_agents()
        if ":" not in agent and agent not in known:
            raise rpc.RpcError(
                ErrorCode.UNKNOWN_AGENT,
                f"unknown agent {agent!r}; available: {', '.join(known)} (or name one as package.module:attr)",
                {"agent": agent},
            )
        cwd = params.get("cwd") or os.getcwd()
        if not os.path.isdir(cwd):
            raise rpc.RpcError(ErrorCode.INVALID_PARAMS, f"cwd is not an existing directory: {cwd!r}", {"param": "cwd"})
        title = params.get("title") or ""
        if len(title) > config.max_title_chars:
            raise rpc.RpcError(
                ErrorCode.INVALID_PARAMS,
                f"title is {len(title)} characters long; at most max_title_chars={config.max_title_chars}",
                {"param": "title"},
            )
        if self.live_count >= config.max_sessions:
            raise self._session_limit()
        owned = sum(1 for sid in conn.sessions if sid in self._sessions and self._sessions[sid].live)
        if owned >= config.max_sessions_per_connection:
            raise rpc.RpcError(
                ErrorCode.LIMIT_REACHED,
                "per-connection session limit reached: "
                f"max_sessions_per_connection={config.max_sessions_per_connection}",
                {"limit": "max_sessions_per_connection"},
            )
        self._require_store_health()
        session_id = "s" + secrets.token_hex(8)
        session = Session(
            session_id,
            agent,
            params.get("options") or {},
            os.path.abspath(cwd),
            title,
            bool(params.get("close_on_disconnect", False)),
            self._new_stream(session_id),
            config.max_queued_prompts,
        )
        if self.store is not None:
            try:
                self.store.create_session(
                    {
                        "session_id": session.id,
                        "agent": agent,
                        "title": title,
                        "cwd": session.cwd,
                        "status": session.status.value,
                        "created_at": session.created_at,
                        "last_active": session.last_active,
                        "close_on_disconnect": session.close_on_disconnect,
                        "options": {k: v for k, v in session.options.items() if k not in _SECRET_OPTIONS},
                    }
                )
            except (StoreError, ValueError) as exc:
                raise rpc.RpcError(ErrorCode.STORE_UNAVAILABLE, f"session store unavailable: {exc}") from None
        self._sessions[session.id] = session
        self._attach(session, conn)
        if not conn.is_open:  # the owner left while we were validating
            await self.connection_lost(conn)
        started = time.monotonic()
        try:
            await self._start_worker(session)
        except rpc.RpcError:
            # The client never learned this session's id: end it without sending it events.
            self._disown(session)
            await self.close(session.id, CloseReason.WORKER_DIED, missing_ok=True)
            raise
        worker = session.slot.worker
        if not session.live or worker is None:
            raise rpc.RpcError(
                ErrorCode.NOT_FOUND,
                f"session {session.id} was closed while its worker was starting",
                {"session_id": session.id},
            )
        self.metrics.worker_start.observe(time.monotonic() - started)
        return {
            "session_id": session.id,
            "agent": session.agent,
            "worker_pid": worker.pid,
            **({"node": worker.node} if worker.node else {}),  # Ray backend: where it runs
            "created_at": session.created_at,
        }

    async def _start_worker(self, session: Session) -> None:
        """Give ``session`` a fresh worker; a worker that arrives after the session closed is stopped."""
        session.slot.state = SlotState.STARTING
        session.turns.worker_starting()
        if session.restored and session.agent_state is None and self.store is not None:
            session.restored = False
            try:
                stored = await self.store.get_state(session.id)
                session.agent_state = None if stored == b"null" else stored
            except StoreError as exc:
                logger.warning("session %s: its saved agent state could not be read: %s", session.id, exc)
        try:
            worker = await self.backend.acquire(
                session.agent, session.options, session.cwd, session.id, state=session.agent_state
            )
        except UnknownAgentError as exc:
            session.slot.empty()
            raise rpc.RpcError(ErrorCode.UNKNOWN_AGENT, str(exc), {"agent": session.agent}) from None
        except SavedStateError as exc:
            # Unusable for good (a broken or hostile worker saved it): keeping it would fail every start,
            # after restarts too.  Dropped loudly; the next start has no state.
            session.slot.empty()
            session.agent_state = None
            logger.warning("session %s: dropped its saved agent state: %s", session.id, exc)
            if self.store is not None:
                try:
                    self.store.put_state(session.id, session.seq, b"null")  # read back as no state
                except StoreError as store_exc:
                    logger.warning("session %s: the store kept its unusable state: %s", session.id, store_exc)
            raise rpc.RpcError(
                ErrorCode.WORKER_START_FAILED,
                f"worker failed to start: {exc}; the state was dropped, the next prompt starts the agent without it",
            ) from None
        except WorkerStartError as exc:
            session.slot.empty()
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in (errno.EMFILE, errno.ENFILE):
                raise rpc.RpcError(
                    ErrorCode.LIMIT_REACHED,
                    "the gateway is out of file descriptors "
                    f"({cause.strerror}); close sessions or terminals, or raise its ulimit -n",
                    {"limit": "open_files"},
                ) from None
            raise rpc.RpcError(ErrorCode.WORKER_START_FAILED, f"worker failed to start: {exc}") from None
        if not session.live:  # closed meanwhile (the create/close race): never attach
            await worker.stop()
            return
        reader = asyncio.get_running_loop().create_task(self._read_worker(session, worker), name=f"reader-{session.id}")
        session.slot.attach(worker, reader)
        session.turns.worker_ready()
        self._next_prompt(session)

    def _ensure_worker(self, session: Session) -> None:
        """Start a replacement worker in the background (after a death or an interrupt)."""
        if session.slot.state is not SlotState.NONE or not session.live:
            return

        async def start() -> None:
            try:
                await self._start_worker(session)
            except rpc.RpcError as err:
                # Fail every queued prompt rather than leaving them waiting for a worker that won't come.
                session.turns.worker_lost()
                for prompt in session.turns.drain():
                    self._emit(session, EventType.TURN_START, {"turn_id": prompt.turn_id, "text": prompt.text})
                    self._emit(
                        session,
                        EventType.TURN_COMPLETE,
                        {"turn_id": prompt.turn_id, "status": TurnStatus.ERROR, "error": err.message},
                    )

        session.slot.starting(asyncio.get_running_loop().create_task(start(), name=f"starter-{session.id}"))

    # Ownership -----------------------------------------------------------------------------------------
    def _attach(self, session: Session, conn: Connection) -> None:
        previous = session.owner
        if previous is not None and previous is not conn:
            previous.sessions.discard(session.id)
            previous.remove_drain_listener(session.id)
            previous.send(rpc.encode_event(EventType.SESSION_DETACHED, {"reason": "superseded"}, session.id, None))
        session.owner = conn
        session.detached_at = None
        session.detached_bytes = 0
        if isinstance(session.stream.log, DurableEventLog):
            session.stream.log.keep_unsettled = True
        conn.sessions.add(session.id)
        conn.add_drain_listener(session.id, lambda: self._pump(session))
        if session.reap_timer is not None:
            session.reap_timer.cancel()
            session.reap_timer = None

    def _disown(self, session: Session) -> None:
        if session.owner is not None:
            session.owner.remove_drain_listener(session.id)
            session.owner.sessions.discard(session.id)
        session.owner = None

    def _detach(self, session: Session) -> None:
        self._disown(session)
        session.detached_at = time.monotonic()
        if isinstance(session.stream.log, DurableEventLog):
            # Nobody reads now: the turn runs on into the log (up to the quota), the cache keeps the newest.
            session.stream.log.keep_unsettled = False
            session.room.set()
        self._schedule_reap(session)

    async def connection_lost(self, conn: Connection) -> None:
        """The owner went away: close ``close_on_disconnect`` sessions, detach the others for the grace."""
        closing = []
        for session_id in list(conn.sessions):
            draining = self._draining.pop(session_id, None)
            if draining is not None:
                self._disown(draining)
                continue
            session = self._sessions.get(session_id)
            if session is None or session.owner is not conn:
                continue
            if session.close_on_disconnect:
                closing.append(self.close(session.id, CloseReason.DISCONNECT, missing_ok=True))
            else:
                self._detach(session)
        conn.sessions.clear()
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)

    async def resume(self, conn: Connection, request_id: int | str | None, params: dict[str, Any]) -> list[str]:
        """Re-attach to ``conn``: the response, then (through the normal pump, bounded by the connection's
        budget) every held event after ``after_seq`` in order, before any live event.  A stored closed
        session is reopened first."""
        if params["session_id"] not in self._sessions:
            await self._reopen(params["session_id"])
        session = self.get(params["session_id"])
        after = max(0, params.get("after_seq", 0))
        if after > session.seq:
            raise rpc.RpcError(
                ErrorCode.INVALID_PARAMS,
                f"after_seq {after} is beyond the session's last seq {session.seq}",
                {"param": "after_seq"},
            )
        self._attach(session, conn)
        session.touch()
        log = session.stream.log
        held = log.since(after)
        if log.persistent:  # older than the cache is on disk, not lost
            held = type(held)(held.frames, False, after + 1)
        replayed = session.seq - (held.first_seq - 1 if held.truncated else after)
        frames = [
            rpc.encode_result(
                request_id,
                {
                    "session_id": session.id,
                    "status": session.status.value,
                    "last_seq": session.seq,
                    "replayed": replayed,
                    "truncated": held.truncated,
                },
            )
        ]
        if held.truncated:
            frames.append(EventStream.truncation_frame(session.id, held.first_seq))
            after = held.first_seq - 1
        session.stream.rewind(after)
        return frames

    def after_resume(self, session_id: str) -> None:
        """Called once the resume's response is queued: start the replay."""
        session = self._sessions.get(session_id)
        if session is not None:
            self._pump(session)

    def ack(self, conn: Connection, session_id: str, seq: int) -> dict[str, Any]:
        """The owner has processed events up to ``seq``: the log may forget them.  An ack from a connection
        that is not (or no longer) the owner changes nothing: it may race with a resume elsewhere."""
        session = self._readable(session_id)
        if session.owner is not conn:
            return {"acked_seq": None, "owner": False}
        return {"acked_seq": session.stream.ack(seq), "owner": True}

    async def events_since_text(self, request_id: int | str | None, params: dict[str, Any]) -> bytes:
        """The response to ``session.events.since``, built by concatenation: the held events already hold
        their encoded payloads, which are never decoded on the loop.  One page of at most
        ``events_page_max_bytes``; ``more`` says whether to ask again from ``next_after_seq``."""
        session_id = params["session_id"]
        if session_id not in self._sessions and session_id not in self._draining:
            await self._reopen_for_reading(session_id)
        session = self._readable(session_id)
        after = max(0, min(params["after_seq"], session.seq))
        log = session.stream.log
        durable = log.durable_seq
        page = await log.read(after, self.config.events_page_max_events, self.config.events_page_max_bytes)
        frames = page.frames[: max(0, durable - page.first_seq + 1)]
        last = page.first_seq + len(frames) - 1 if frames else max(after, page.first_seq - 1)
        more = last < durable
        events = b",".join(frame[len(rpc.EVENT_PARAMS_AT) : -1] for frame in frames)
        return b"".join(
            (
                b'{"jsonrpc":"2.0","id":',
                encode_json(request_id),
                b',"result":{"events":[',
                events,
                b'],"last_seq":',
                str(durable).encode(),
                b',"truncated":',
                b"true" if page.truncated else b"false",
                b',"more":',
                b"true" if more else b"false",
                b',"next_after_seq":',
                str(last).encode(),
                b"}}",
            )
        )

    async def _reopen_for_reading(self, session_id: str) -> None:
        """A stored closed session, readable by events.since without reopening it."""
        if self.store is None:
            return
        row = await self.store.get_session(session_id)
        if row is not None and session_id not in self._sessions:
            session = self._session_from_row(row)
            session.turns.closed()
            self._draining[session_id] = session
            asyncio.get_running_loop().call_later(_DRAIN_KEEP_S, self._finish_draining, session)

    # The event stream ------------------------------------------------------------------------------------
    def _emit(self, session: Session, event_type: str, payload: dict[str, Any]) -> None:
        self._produce(session, event_type, encode_json(payload))

    def _produce(self, session: Session, event_type: str, payload_json: bytes) -> None:
        try:
            frame = session.stream.produce(event_type, payload_json)
        except StoreError as exc:  # the writer is gone: fail closed, loudly (health says why)
            logger.error("session %s: event %s not stored: %s", session.id, event_type, exc)
            raise
        if session.owner is None:
            session.detached_bytes += len(frame)
        self._entered(session, 1, len(frame))
        if event_type == EventType.TURN_START:
            session.turns.turn_started()
            self._store_update(session, status=session.status.value)
        elif event_type == EventType.TURN_COMPLETE:
            self.metrics.turn_completed(payload_json)
            self._turn_finished(session)
            if session.live:
                self._store_update(session, status=session.status.value)
        self._pump(session)

    def _pump(self, session: Session) -> None:
        """Queue undelivered durable events to the owner while it has room."""
        owner = session.owner
        if owner is None or not owner.is_open:
            return
        if session.backfill is not None:
            return  # the disk reader delivers first, then pumps again
        stream = session.stream
        if stream.pending:
            settler = self._settler(session, owner)
            items: list[tuple[bytes, _Settler | None, int]] = []
            nbytes = 0
            for item in stream.deliver(owner.room_bytes):
                if type(item) is tuple:
                    seq, frame = item
                    items.append((frame, settler, seq))
                    nbytes += len(frame)
                    continue
                if items:  # what came before the gap or the disk goes first
                    owner.send_events(items, nbytes)
                    items, nbytes = [], 0
                if isinstance(item, OnDisk):
                    session.backfill = asyncio.get_running_loop().create_task(
                        self._backfill(session, owner), name=f"backfill-{session.id}"
                    )
                    return
                if isinstance(item, Gap):
                    owner.send(EventStream.truncation_frame(session.id, item.first_seq))
            if items:
                owner.send_events(items, nbytes)
        if session.status is SessionStatus.CLOSED and not stream.undelivered:
            self._finish_draining(session)

    async def _backfill(self, session: Session, owner: Connection) -> None:
        """Deliver from disk what the cache no longer holds, in bounded pieces, then hand back to the pump."""
        stream = session.stream
        try:
            while (
                session.owner is owner
                and owner.is_open
                and stream.log.get(stream.delivered + 1) is None
                and stream.delivered < stream.log.durable_seq
            ):
                piece = await stream.log.read(stream.delivered, _DISK_PIECE_EVENTS, _DISK_PIECE_BYTES)
                if session.owner is not owner or not owner.is_open or not piece.frames:
                    break
                if piece.truncated:  # retention already deleted them: say so, never a silent gap
                    owner.send(EventStream.truncation_frame(session.id, piece.first_seq))
                    stream.delivered = max(stream.delivered, piece.first_seq - 1)
                settler = self._settler(session, owner)
                for seq, frame in enumerate(piece.frames, piece.first_seq):
                    if seq <= stream.delivered:
                        continue
                    if seq > stream.log.durable_seq:
                        break
                    owner.send(frame, settler, seq)
                    stream.delivered = seq
                if not owner.has_room:
                    await owner.wait_for_room()
        except StoreError as exc:
            logger.error("session %s: reading its events from the store failed: %s", session.id, exc)
        finally:
            session.backfill = None
        self._pump(session)

    def _settler(self, session: Session, conn: Connection) -> _Settler:
        """What the connection calls with the last seq of a batch of ``session``'s events that reached its
        socket (equal for every event of one session and owner, so a batch is settled with one call)."""
        return _Settler(self, session, conn)

    def _settled(self, session: Session, conn: Connection, seq: int) -> None:
        if session.owner is conn:  # a superseded owner's sends say nothing about the new owner
            session.stream.settle(seq)
            if not session.room.is_set() and self._reader_has_room(session):
                session.room.set()

    def _reader_has_room(self, session: Session) -> bool:
        """Whether the worker's pipe may be read now.  Attached: while the owner's unsettled events are
        bounded.  Detached with a store: while the turn's output since the detach is under the quota.
        With a store, always while the writer is not too far behind."""
        store = self.store
        if store is not None and store.pending_bytes > _STORE_PENDING_MAX:
            return False
        if store is not None and session.owner is None:
            return session.detached_bytes < self.config.detached_quota_bytes
        return session.stream.reader_has_room

    async def _read_worker(self, session: Session, worker: Worker) -> None:
        """Relay the worker's frames, a batch (everything one pipe read brought) at a time.  Backpressure,
        replacement and the budgets apply between any two events: each event is relayed only once its
        session has room, and the loop-wide relay budget (``LoopReads``) bounds what all sessions together
        relay per turn of the loop.  Runs of plain events are relayed without suspending
        (:meth:`_relay_run`)."""
        corrupt: str | None = None
        since_yield = 0
        slot = session.slot
        loop_reads = LoopReads.of(asyncio.get_running_loop())
        try:
            async for batch in worker.frame_batches():
                i, n = 0, len(batch)
                while i < n:
                    frame = batch[i]
                    if frame.kind is not Kind.EVENT:
                        if frame.kind is Kind.CONTROL and frame.name == Op.STATE:
                            session.agent_state = _state_of(frame.body)
                            if self.store is not None and session.agent_state is not None:
                                self.store.put_state(session.id, session.seq, session.agent_state)
                        i += 1
                        continue
                    if since_yield >= _YIELD_EVERY_BYTES:
                        # A batch and the queued batches after it come without suspending: give other
                        # sessions and the pings a turn instead of relaying a whole backlog in one go.
                        since_yield = 0
                        await asyncio.sleep(0)
                    # Every session together: wait, one loop iteration at a time, for the budget's reset.
                    while loop_reads.relay_spent:  # noqa: ASYNC110 - no event to wait for: a new iteration
                        await asyncio.sleep(0)
                    while not self._reader_has_room(session) and slot.is_current(worker):
                        session.room.clear()
                        if session.blocked_since is None:
                            session.blocked_since = time.monotonic()
                            if session.owner is None:
                                self._schedule_reap(session)
                        await session.room.wait()
                    session.blocked_since = None
                    if not slot.is_current(worker):
                        break
                    limit = min(_YIELD_EVERY_BYTES - since_yield, loop_reads.relay_left)
                    i, relayed = self._relay_run(session, batch, i, limit)
                    since_yield += relayed
                    loop_reads.spend_relay(relayed)
                if not slot.is_current(worker):
                    break
        except ChannelError as exc:
            corrupt = str(exc)
            logger.warning("session %s: corrupt frame from worker %s: %s", session.id, worker.pid, exc)
        except InvalidEventType as exc:
            corrupt = f"an event type a worker may not send: {exc.args[0][:80]!r}"
            logger.warning("session %s: corrupt frame from worker %s: %s", session.id, worker.pid, corrupt)
        if not slot.is_current(worker):
            return  # stopped on purpose (replacement or teardown): not a death
        # EOF or garbage without us asking: the worker is dying or broken; make sure its group is gone.
        status = await worker.stop()
        if slot.is_current(worker):
            self._worker_died(session, status, corrupt)

    def _relay_run(self, session: Session, batch: list[Frame], start: int, limit: int) -> tuple[int, int]:
        """Relay ``batch[start]`` (an event the session has room for) and the plain events right after it
        while the session has room and their payloads stay under ``limit`` bytes; one pump, one touch and
        one metrics update for the run.  A turn's start or end is relayed on its own (:meth:`_produce`: it
        moves the turn queue).  Returns (the index after the run, the payload bytes relayed)."""
        frame = batch[start]
        if frame.name in _TURN_EDGES:
            self._produce(session, frame.name, frame.body)
            return start + 1, len(frame.body)
        stream = session.stream
        detached = session.owner is None  # cannot change during the run: nothing here suspends
        end, payload_bytes, frame_bytes = start, 0, 0
        try:
            while True:
                if frame.name not in WORKER_EVENT_TYPES:
                    raise InvalidEventType(frame.name)
                size = len(stream.produce(frame.name, frame.body))
                frame_bytes += size
                payload_bytes += len(frame.body)
                if detached:  # the detached quota is checked before the next event: count this one now
                    session.detached_bytes += size
                end += 1
                if end == len(batch) or payload_bytes >= limit:
                    break
                frame = batch[end]
                if frame.kind is not Kind.EVENT or frame.name in _TURN_EDGES or not self._reader_has_room(session):
                    break
        except StoreError as exc:  # the writer is gone: fail closed, loudly (health says why)
            logger.error("session %s: event %s not stored: %s", session.id, frame.name, exc)
            raise
        finally:
            if end > start:
                self._entered(session, end - start, frame_bytes)
                self._pump(session)
        return end, payload_bytes

    def _entered(self, session: Session, events: int, frame_bytes: int) -> None:
        """Bookkeeping after ``events`` events of ``frame_bytes`` entered the session's stream (a detached
        session's bytes are counted by the producer, event by event: its quota is checked between them)."""
        session.touch()
        self.metrics.events_relayed.inc(events)
        self.metrics.bytes_relayed.inc(frame_bytes)

    def _worker_died(self, session: Session, status: ExitStatus, reason: str | None) -> None:
        session.slot.empty()
        self.metrics.worker_exits.labels(expected="false").inc()
        self._emit_exit(session, status, expected=False)
        turn_id = session.turns.current
        if turn_id is not None:
            what = reason or (
                f"killed by signal {status.signal}" if status.signal else f"exit status {status.returncode}"
            )
            self._emit(
                session,
                EventType.TURN_COMPLETE,
                {"turn_id": turn_id, "status": TurnStatus.ERROR, "error": f"worker died: {what}"},
            )
        session.turns.worker_lost()
        if session.turns.queued:
            self._ensure_worker(session)

    def _emit_exit(self, session: Session, status: ExitStatus, expected: bool) -> None:
        self._emit(
            session,
            EventType.WORKER_EXITED,
            {"pid": status.pid, "returncode": status.returncode, "signal": status.signal, "expected": expected},
        )

    # Turns ---------------------------------------------------------------------------------------------
    def submit(self, session_id: str, text: str) -> dict[str, Any]:
        session = self.get(session_id)
        try:
            prompt = session.turns.submit(text)
        except QueueFull as exc:
            raise rpc.RpcError(
                ErrorCode.BUSY,
                f"prompt queue full: {exc.args[0]} prompts already wait "
                f"(max_queued_prompts={self.config.max_queued_prompts}); retry after a turn "
                "completes",
                {"limit": "max_queued_prompts"},
            ) from None
        session.touch()
        started = self._next_prompt(session)
        if session.slot.state is SlotState.NONE:
            self._ensure_worker(session)
        return {"status": "started" if started == prompt.turn_id else "queued", "turn_id": prompt.turn_id}

    def _next_prompt(self, session: Session) -> str | None:
        prompt = session.turns.take_next(session.slot.ready)
        if prompt is None:
            return None
        worker = session.slot.worker
        assert worker is not None  # slot.ready
        session.turn_ended[prompt.turn_id] = asyncio.get_running_loop().create_future()
        session.touch()
        worker.send(Op.PROMPT, {"turn_id": prompt.turn_id, "text": prompt.text})
        worker.turn_running(True)
        return prompt.turn_id

    def _turn_finished(self, session: Session) -> None:
        turn_id = session.turns.turn_finished()
        if turn_id is not None:
            future = session.turn_ended.pop(turn_id, None)
            if future is not None and not future.done():
                future.set_result(turn_id)
        worker = session.slot.worker
        if session.live and self._next_prompt(session) is not None:
            return  # the next turn runs on (its session keeps its CPU share)
        if worker is not None:
            worker.turn_running(False)
        if session.live and session.owner is None and not session.turns.busy:
            self._schedule_reap(session)

    async def interrupt(self, session_id: str) -> dict[str, Any]:
        session = self.get(session_id)
        turn_id = session.turns.current
        worker = session.slot.worker
        if turn_id is None:
            return {"status": "not_running"}
        ended = session.turn_ended.get(turn_id)
        if ended is None or ended.done():
            return {"status": "interrupted"}
        if worker is not None:
            worker.send(Op.CANCEL, {"turn_id": turn_id})
        try:
            await asyncio.wait_for(asyncio.shield(ended), self.config.interrupt_grace_s)
        except TimeoutError:
            # Several callers can get here for one turn: only the first replaces the worker, the others
            # wait for the turn to end through it.
            if (
                session.turns.current == turn_id
                and session.live
                and worker is not None
                and session.slot.is_current(worker)
            ):
                await self._replace_worker(session, worker, turn_id)
            elif not ended.done():
                await asyncio.wait([asyncio.shield(ended)], timeout=self.config.kill_grace_s + 5.0)
        await self._until_delivered(session)
        return {"status": "interrupted"}

    async def _replace_worker(self, session: Session, worker: Worker, turn_id: str) -> None:
        """The turn ignored the cancel (e.g. stuck in C code holding the GIL): kill the group, finish the
        turn as interrupted, and start a fresh worker so the session stays usable."""
        slot = session.slot
        reader = slot.reader
        slot.release()
        session.room.set()  # release a reader waiting for room so it sees the worker is stale
        status = await worker.stop()
        if reader is not None:
            await asyncio.wait([reader], timeout=1.0)
            reader.cancel()
        if slot.state is SlotState.STOPPING:
            slot.empty()
        self.metrics.worker_exits.labels(expected="true").inc()
        self._emit_exit(session, status, expected=True)
        if session.turns.current == turn_id:
            self._emit(session, EventType.TURN_COMPLETE, {"turn_id": turn_id, "status": TurnStatus.INTERRUPTED})
        session.turns.worker_lost()
        if session.live:
            self._ensure_worker(session)

    # Slash commands ------------------------------------------------------------------------------------
    async def slash_exec(self, session_id: str, command: str) -> dict[str, Any]:
        from gateway.slash import SlashRunner
        from workers.backends.slash import slash_backend_for

        session = self.get(session_id)
        if session.slash is None:  # on the node of the session's agent worker (the Ray backend)
            node = lambda: session.slot.worker.node if session.slot.worker is not None else None  # noqa: E731
            session.slash = SlashRunner(self.config, session.cwd, slash_backend_for(self.backend, self.config), node)
        session.touch()
        result = await session.slash.exec(command, session.snapshot())
        if session.live:  # part of the session's history: it replays like every other event
            self._emit(
                session,
                EventType.SLASH_RESULT,
                {"command": command, "ok": result.get("ok", False), "output": result.get("output", "")},
            )
        return result

    # Reaping -------------------------------------------------------------------------------------------
    def _schedule_reap(self, session: Session) -> None:
        """Arm one timer for the next deadline of a detached session (see :mod:`gateway.sessions.reaping`)."""
        if session.reap_timer is not None:
            session.reap_timer.cancel()
            session.reap_timer = None
        if session.owner is not None or not session.live:
            return
        config = self.config
        decision = reap_decision(
            ReapInputs(
                detached_at=session.detached_at,
                last_active=session.last_active_mono,
                busy=session.turns.busy,
                blocked_since=session.blocked_since,
                grace_s=config.grace_s,
                idle_ttl_s=config.idle_ttl_s,
                blocked_s=config.blocked_detached_s,
            ),
            time.monotonic(),
        )
        if decision.close is not None:
            self._spawn_close(session, decision.close)
        elif decision.wake_at is not None:
            delay = max(0.0, decision.wake_at - time.monotonic()) + 0.001
            session.reap_timer = asyncio.get_running_loop().call_later(delay, self._schedule_reap, session)

    def _spawn_close(self, session: Session, reason: str) -> None:
        asyncio.get_running_loop().create_task(
            self.close(session.id, reason, missing_ok=True), name=f"reap-{session.id}"
        )

    # The teardown funnel --------------------------------------------------------------------------------
    async def close(self, session_id: str, reason: str, missing_ok: bool = False) -> dict[str, Any]:
        """End a session: every path comes here.  Idempotent: a second call waits for the first."""
        session = self._sessions.get(session_id)
        if session is None:
            if missing_ok or session_id in self._draining:
                return {"closed": True}
            raise rpc.RpcError(ErrorCode.NOT_FOUND, f"session not found: {session_id!r}", {"session_id": session_id})
        if session.teardown is None:
            session.teardown = asyncio.get_running_loop().create_task(
                self._teardown(session, reason), name=f"teardown-{session.id}"
            )
        return await asyncio.shield(session.teardown)

    async def _teardown(self, session: Session, reason: str) -> dict[str, Any]:
        started = time.monotonic()
        session.turns.closing()
        if session.reap_timer is not None:
            session.reap_timer.cancel()
            session.reap_timer = None
        slot = session.slot
        starter = slot.starter
        worker = slot.release()
        session.room.set()
        stops: list[Any] = []
        if worker is not None:
            stops.append(worker.stop())
        if session.slash is not None:
            stops.append(session.slash.close())
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.error("session %s: teardown step failed: %r", session.id, result)
        for task in (slot.reader, starter):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        slot.empty()
        for future in session.turn_ended.values():
            if not future.done():
                future.set_result("closed")  # an interrupt waiting on the turn gets its answer
        if worker is not None and isinstance(results[0], ExitStatus):
            self._emit_exit(session, results[0], expected=True)
        self._emit(session, EventType.SESSION_CLOSED, {"reason": str(reason)})
        session.turns.closed()
        await self._until_delivered(session)  # still in _sessions: the store's commit reaches it
        self._sessions.pop(session.id, None)
        if session.owner is not None and session.owner.is_open and session.stream.undelivered:
            # The owner is behind: keep the session until its last events (session.closed included)
            # reach it, or it leaves.  events.since can read them meanwhile.
            self._draining[session.id] = session
            asyncio.get_running_loop().call_later(_DRAIN_KEEP_S, self._finish_draining, session)
        else:
            self._disown(session)
        if self.store is not None:
            self._store_update(session, status=SessionStatus.CLOSED.value, closed_reason=str(reason))
        elif reason != CloseReason.DELETED:
            summary = session.summary()
            del summary["attached"]
            self._closed[session.id] = {**summary, "status": SessionStatus.CLOSED.value, "closed_reason": str(reason)}
            while len(self._closed) > _CLOSED_KEPT:
                self._closed.popitem(last=False)
        self.metrics.reaps.labels(reason=str(reason)).inc()
        self.metrics.teardown.observe(time.monotonic() - started)
        return {"closed": True}

    def _finish_draining(self, session: Session) -> None:
        if self._draining.get(session.id) is session:
            del self._draining[session.id]
        self._disown(session)

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(
            *(self.close(sid, reason, missing_ok=True) for sid in list(self._sessions)), return_exceptions=True
        )


class _Settler:
    """``Connection.send``'s settle callback for one session and owner: equal settlers are coalesced."""

    __slots__ = ("conn", "registry", "session")

    def __init__(self, registry: SessionRegistry, session: Session, conn: Connection) -> None:
        self.registry = registry
        self.session = session
        self.conn = conn

    def __call__(self, seq: int) -> None:
        self.registry._settled(self.session, self.conn, seq)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Settler) and other.session is self.session and other.conn is self.conn

    def __hash__(self) -> int:
        return hash((id(self.session), id(self.conn)))


def _not_found(session_id: str) -> rpc.RpcError:
    return rpc.RpcError(
        ErrorCode.NOT_FOUND, f"session not found: {session_id!r} (closed, or never existed)", {"session_id": session_id}
    )


def _state_of(body: bytes) -> bytes | None:
    """The ``state`` of an ``Op.STATE`` frame, kept encoded (the worker encoded it; the next worker decodes)."""
    prefix = b'{"state":'
    if body.startswith(prefix) and body.endswith(b"}") and body.count(b'"state"') == 1:
        value = body[len(prefix) : -1].strip()
    else:  # another encoder's spelling: decode (state frames are rare: one per turn)
        try:
            decoded = json.loads(body)
        except ValueError:
            return None
        value = encode_json(decoded.get("state")) if isinstance(decoded, dict) else b"null"
    return None if value == b"null" else value
