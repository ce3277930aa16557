"""One session's event stream: ``seq`` assignment, the log, and what its owner has been given.  No I/O.

``produce`` gives each event the next ``seq`` and appends its frame to the :class:`EventLog` at once, so
events the gateway makes itself (``worker.exited``, ``session.closed``...) and those relayed from the worker
share one gapless order.  ``deliver`` then hands the caller the frames the owner may get now: those after
:attr:`delivered`, up to the log's durable seq, while the owner has room.  The registry sends them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from gateway import rpc
from gateway.store.log import EventLog
from gateway.wire import EventType

#: Event types whose envelope prefix a stream keeps (the gateway's own and a well-behaved agent's are a few).
_PREFIXES_KEPT = 64
#: What an event type may be: it goes into the envelope's JSON string unescaped (a worker names its events).
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class InvalidEventType(ValueError):
    """A worker named an event with characters an event type cannot have, or with a type only the gateway
    sends (a broken or hostile worker)."""


@dataclass(frozen=True)
class Gap:
    """Events after ``delivered`` are no longer held: the owner is told with ``replay.truncated``."""

    first_seq: int


@dataclass(frozen=True)
class OnDisk:
    """The events after ``delivered`` are on disk only: the registry reads them before going on."""


class EventStream:
    def __init__(
        self, session_id: str, log: EventLog, *, reader_max_events: int, reader_max_bytes: int, seq: int = 0
    ) -> None:
        self.session_id = session_id
        self.log = log
        self.seq = seq  # last seq assigned
        self.delivered = seq  # last seq handed to the owner (queued on its connection)
        self._reader_max_events = reader_max_events
        self._reader_max_bytes = reader_max_bytes
        #: The envelope up to the seq, per event type (a worker names its event types: bounded here).
        self._prefixes: dict[str, bytes] = {}

    def produce(self, event_type: str, payload_json: bytes) -> bytes:
        """Assign the next seq to an event whose payload is already encoded; returns its frame, UTF-8 bytes
        that the log, the store and the socket share (a worker's invalid UTF-8 is replaced, once, here)."""
        prefix = self._prefixes.get(event_type)
        if prefix is None:
            if not _EVENT_TYPE.fullmatch(event_type):
                raise InvalidEventType(event_type)
            prefix = rpc.event_prefix(event_type, self.session_id)
            if len(self._prefixes) < _PREFIXES_KEPT:
                self._prefixes[event_type] = prefix
        self.seq += 1
        # The envelope is ASCII: checking the whole frame is checking the payload, and it accepts any
        # bytes-like payload (a slice of a reader's buffer).
        frame = rpc.valid_utf8(rpc.wrap_event_after(prefix, self.seq, payload_json))
        self.log.append(self.seq, event_type, frame)
        return frame

    @property
    def pending(self) -> bool:
        """Durable events the owner has not been given yet."""
        return self.delivered < self.log.durable_seq

    @property
    def undelivered(self) -> bool:
        """Events (durable or not yet) the owner has not been given."""
        return self.delivered < self.seq

    def deliver(self, room: int) -> Iterator[tuple[int, bytes] | Gap | OnDisk]:
        """Frames for the owner, in order, while it has ``room`` bytes left (the last one may go past it:
        the owner's budget is "under its bound before each send"); advances :attr:`delivered` as it goes."""
        log = self.log
        durable = log.durable_seq
        get = log.get
        while self.delivered < durable and room > 0:
            seq = self.delivered + 1
            frame = get(seq)
            if frame is None and log.persistent:
                yield OnDisk()
                return
            if frame is None:  # no longer held: say so instead of leaving a silent gap
                first = log.since(seq).first_seq
                self.delivered = first - 1
                yield Gap(first)
                continue
            self.delivered = seq
            room -= len(frame)
            yield seq, frame

    def rewind(self, after_seq: int) -> None:
        """A new owner has everything up to ``after_seq``: deliver from there, and the log may forget it."""
        self.delivered = after_seq
        self.log.ack(after_seq)

    def ack(self, seq: int) -> int:
        """The owner acknowledged ``seq``; returns the acknowledged seq (never beyond what it was given)."""
        seq = min(seq, self.delivered)
        self.log.ack(seq)
        return seq

    def settle(self, seq: int) -> None:
        self.log.settle(seq)

    @property
    def reader_has_room(self) -> bool:
        """Whether the worker's pipe may be read: events the owner's socket has not taken are bounded."""
        return self.log.unsettled_count < self._reader_max_events and self.log.unsettled_bytes < self._reader_max_bytes

    @staticmethod
    def truncation_frame(session_id: str, first_seq: int) -> str:
        return rpc.encode_event(EventType.REPLAY_TRUNCATED, {"first_seq": first_seq}, session_id, None)
