"""Sessions: a core without I/O (the event stream, the turn queue, the reap deadlines) and the asyncio
registry that feeds it and keeps the one teardown funnel."""

from __future__ import annotations

from gateway.sessions.registry import SessionRegistry
from gateway.sessions.session import Session, SlotState, WorkerSlot
from gateway.sessions.turns import SessionStatus

__all__ = ["Session", "SessionRegistry", "SessionStatus", "SlotState", "WorkerSlot"]
