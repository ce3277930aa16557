"""When a detached session is closed: a pure function of the session's timestamps, its state and a clock.

PROTOCOL section 5: a detached session is kept for the grace period; once it ends, an idle session is
closed (``grace_expired``) while a busy one runs on until its turn ends; any detached session idle for the
idle TTL is closed (``idle_timeout``).  Extension: a detached session that is *blocked* (its worker waits on
a full pipe because nobody reads its events) for longer than ``blocked_s`` is closed (``blocked``): it can
make no progress, and without this bound only the idle TTL would reclaim it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.wire import CloseReason


@dataclass(frozen=True)
class ReapInputs:
    detached_at: float | None  # monotonic; None while attached
    last_active: float  # monotonic
    busy: bool
    blocked_since: float | None  # monotonic: since when the reader waits for room, None if it does not
    grace_s: float  # 0 = keep until the idle TTL
    idle_ttl_s: float
    blocked_s: float | None  # None = no bound


@dataclass(frozen=True)
class ReapDecision:
    close: CloseReason | None  # close now for this reason
    wake_at: float | None  # else: look again at this monotonic time (None = nothing to wait for)


def reap_decision(inputs: ReapInputs, now: float) -> ReapDecision:
    if inputs.detached_at is None:
        return ReapDecision(None, None)
    idle_end = inputs.last_active + inputs.idle_ttl_s
    if now >= idle_end:
        return ReapDecision(CloseReason.IDLE_TIMEOUT, None)
    deadlines = [idle_end]
    if inputs.grace_s > 0:
        grace_end = inputs.detached_at + inputs.grace_s
        if now >= grace_end and not inputs.busy:
            return ReapDecision(CloseReason.GRACE_EXPIRED, None)
        if now < grace_end:
            deadlines.append(grace_end)
    if inputs.blocked_s is not None and inputs.blocked_since is not None:
        blocked_end = max(inputs.blocked_since, inputs.detached_at) + inputs.blocked_s
        if now >= blocked_end:
            return ReapDecision(CloseReason.BLOCKED, None)
        deadlines.append(blocked_end)
    return ReapDecision(None, min(deadlines))
