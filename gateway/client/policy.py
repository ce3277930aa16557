"""How the client behaves over time: the reconnect backoff, its connection state and its counters."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ReconnectPolicy:
    """How the client reconnects after a dropped connection.

    Delay before attempt ``n`` (0-based): ``min(max_delay, initial_delay * multiplier**n)`` scaled by a
    random factor in ``[1 - jitter, 1]``, so that many clients dropped at once do not reconnect in step.
    It gives up after ``max_attempts`` failed attempts or ``max_time`` seconds since the drop, whichever
    comes first; then every pending iterator raises :class:`ConnectionLost`.
    """

    enabled: bool = True
    initial_delay: float = 0.05
    max_delay: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int = 20
    max_time: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_delay, self.initial_delay * self.multiplier**attempt)
        return base * (1.0 - self.jitter * rng.random())


class ClientState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclass
class ClientStats:
    """Counters a caller (e.g. the load test) reads to judge a run."""

    connects: int = 0  # successful WebSocket handshakes, the first included
    drops: int = 0  # connections that ended without the client closing them
    forced_drops: int = 0  # of those, the ones caused by abort()
    resumes: int = 0  # successful session.resume calls made by reconnects
    replayed: int = 0  # events the gateway re-sent in answer to those resumes
    events: int = 0  # session events queued for the caller (after deduplication)
    duplicates: int = 0  # events filtered out because their seq was already delivered
    truncations: int = 0  # ReplayTruncated raised into iterators
    missing_events: int = 0  # events reported missing by those truncations
    bytes_received: int = 0  # text of every frame received
    acks: int = 0  # session.ack requests the gateway answered
