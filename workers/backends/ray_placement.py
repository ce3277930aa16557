"""Which Ray node gets the next session: a pure choice over a snapshot of the hosts (no Ray, no I/O).

Admission control lives here too: a node takes at most ``sessions_per_node`` sessions, and a session that
finds no node with room waits for one until its deadline (the backend does the waiting; this module only
says whether there is room and where, and why not).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class HostState(enum.Enum):
    STARTING = "starting"  #: actor created, its supervisor not started yet
    READY = "ready"  #: answers pings, takes sessions
    FAILED = "failed"  #: died or stopped answering: never chosen again (a new host replaces it)


@dataclass(frozen=True)
class HostLoad:
    """What placement needs to know about one host actor."""

    node_id: str
    state: HostState
    sessions: int  #: workers handed out plus acquisitions in flight


def choose_node(hosts: Iterable[HostLoad], sessions_per_node: int, avoid: frozenset[str] = frozenset()) -> str | None:
    """The ready node with the fewest sessions below the limit (ties: the lowest node id, so the choice is
    deterministic), skipping ``avoid`` (nodes that just failed this acquisition); None when none has room."""
    best: HostLoad | None = None
    for host in hosts:
        if host.state is not HostState.READY or host.node_id in avoid or host.sessions >= sessions_per_node:
            continue
        if best is None or (host.sessions, host.node_id) < (best.sessions, best.node_id):
            best = host
    return best.node_id if best is not None else None


def no_room_message(hosts: Iterable[HostLoad], sessions_per_node: int, waited_s: float) -> str:
    """Why a session could not be placed, for the 5001 error a client sees."""
    loads = list(hosts)
    ready = [h for h in loads if h.state is HostState.READY]
    if not ready:
        return f"no Ray node is ready to take a session (waited {waited_s:g} s; {len(loads)} host(s) known, none ready)"
    used = sum(h.sessions for h in ready)
    return (
        f"no Ray node has room for a session (waited {waited_s:g} s): {len(ready)} node(s) with "
        f"{used} session(s), at most {sessions_per_node} per node (ray_sessions_per_node)"
    )
