"""When the client acknowledges what it has processed (``session.ack``): a pure core with a given clock.

The gateway keeps a session's events replayable until the client proves it no longer needs them, by a
later ``session.resume`` or by ``session.ack {session_id, seq}``.  The client acknowledges the seq of the
last event its caller has taken from the session's iterator, every ``every_events`` events or
``every_s`` seconds after the first unacknowledged one, whichever comes first, with at most one
acknowledgement in flight per session and ``min_interval_s`` between rounds, so that acks never eat the
connection's request rate.  A gateway that answers -32601 (an older one) makes the tracker stop for good.

No I/O here: :class:`~gateway.client.gateway_client.GatewayClient` asks :meth:`AckTracker.due` what to
send and reports each answer back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AckSupport(enum.Enum):
    """What the tracker knows about the gateway's ``session.ack``."""

    UNKNOWN = "unknown"  #: no answer yet
    SUPPORTED = "supported"  #: the gateway answered an ack
    UNSUPPORTED = "unsupported"  #: -32601: an older gateway; acking stops silently


@dataclass(frozen=True)
class AckPolicy:
    """How often the client acknowledges.  ``enabled=False`` never sends ``session.ack``."""

    enabled: bool = True
    every_events: int = 256
    every_s: float = 0.25
    min_interval_s: float = 0.05


@dataclass
class _SessionAcks:
    processed: int = 0  #: seq of the last event handed to the caller
    acked: int = 0  #: highest seq the gateway confirmed (by an ack answer or a resume)
    in_flight: int | None = None  #: seq of the ack sent and not answered yet
    unacked_since: float | None = None  #: when ``processed`` first went past ``acked`` (and in_flight)


class AckTracker:
    """Per-session acknowledgement bookkeeping; every method takes the caller's ``now`` (monotonic s)."""

    def __init__(self, policy: AckPolicy | None = None) -> None:
        self.policy = policy or AckPolicy()
        self.support = AckSupport.UNKNOWN if self.policy.enabled else AckSupport.UNSUPPORTED
        self._sessions: dict[str, _SessionAcks] = {}
        self._refused: set[str] = set()  # sessions the gateway would not take an ack for
        self._last_round: float | None = None

    @property
    def active(self) -> bool:
        return self.support is not AckSupport.UNSUPPORTED

    def processed(self, session_id: str, seq: int, now: float) -> bool:
        """The caller took the event ``seq``; True when an ack became due by count (wake the sender)."""
        if not self.active or session_id in self._refused:
            return False
        acks = self._sessions.setdefault(session_id, _SessionAcks())
        if seq <= acks.processed:
            return False
        acks.processed = seq
        if acks.unacked_since is None:
            acks.unacked_since = now
        return acks.in_flight is None and seq - acks.acked >= self.policy.every_events

    def due(self, now: float) -> list[tuple[str, int]]:
        """The ``(session_id, seq)`` acks to send now; each is then in flight until answered or failed."""
        if not self.active or (self._last_round is not None and now - self._last_round < self.policy.min_interval_s):
            return []
        out = []
        for session_id, acks in self._sessions.items():
            if acks.in_flight is not None or acks.processed <= acks.acked:
                continue
            by_count = acks.processed - acks.acked >= self.policy.every_events
            by_time = acks.unacked_since is not None and now - acks.unacked_since >= self.policy.every_s
            if by_count or by_time:
                acks.in_flight = acks.processed
                out.append((session_id, acks.processed))
        if out:
            self._last_round = now
        return out

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until an ack may become due by time (``None``: nothing is waiting)."""
        if not self.active:
            return None
        waits = [
            0.0
            if acks.processed - acks.acked >= self.policy.every_events
            else max(0.0, acks.unacked_since + self.policy.every_s - now)
            for acks in self._sessions.values()
            if acks.in_flight is None and acks.processed > acks.acked and acks.unacked_since is not None
        ]
        if not waits:
            return None
        wait = min(waits)
        if self._last_round is not None:
            wait = max(wait, self._last_round + self.policy.min_interval_s - now)
        return wait

    def answered(self, session_id: str, seq: int, now: float) -> None:
        """The gateway confirmed the ack of ``seq``."""
        self.support = AckSupport.SUPPORTED
        acks = self._sessions.get(session_id)
        if acks is None:
            return
        acks.in_flight = None
        acks.acked = max(acks.acked, seq)
        acks.unacked_since = now if acks.processed > acks.acked else None

    def failed(self, session_id: str, now: float) -> None:
        """The ack did not get through (connection lost, timeout, rate limit): try again later."""
        acks = self._sessions.get(session_id)
        if acks is not None:
            acks.in_flight = None
            if acks.processed > acks.acked:
                acks.unacked_since = now

    def unsupported(self) -> None:
        """The gateway does not know ``session.ack`` (-32601): never send another."""
        self.support = AckSupport.UNSUPPORTED
        self._sessions.clear()

    def resumed(self, session_id: str, after_seq: int) -> None:
        """A ``session.resume`` with ``after_seq`` told the gateway as much as an ack would."""
        acks = self._sessions.get(session_id)
        if acks is not None:
            acks.in_flight = None
            acks.acked = max(acks.acked, after_seq)
            if acks.processed <= acks.acked:
                acks.unacked_since = None

    def forget(self, session_id: str) -> None:
        """The session ended (or was taken over): nothing more to acknowledge."""
        self._sessions.pop(session_id, None)

    def refuse(self, session_id: str) -> None:
        """The gateway answered this session's ack with an error that a retry cannot fix: stop for it."""
        self.forget(session_id)
        self._refused.add(session_id)
