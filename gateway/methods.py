"""The JSON-RPC method table: which coroutine answers which method.

Parameters are validated centrally (``rpc.METHOD_PARAMS``) before a handler runs, so handlers receive
well-typed params.  A handler's reply is one explicit type: a result object (encoded as the response), or
:class:`Frames`, already-encoded frames sent in one step (``session.resume``: the response, then its
replay starts; ``session.events.since``: a response built by concatenation).  Handlers get the components
they use through :class:`Components`, never the whole application.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import __version__, rpc
from gateway.wire import PROTOCOL_VERSION, Method

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.connection import Connection
    from gateway.sessions import SessionRegistry
    from gateway.terminals import TerminalRegistry
    from workers.backends import WorkerBackend


@dataclass(frozen=True)
class Components:
    """What the handlers work with; built once by the composition root (``gateway.app``)."""

    config: Config
    sessions: SessionRegistry
    terminals: TerminalRegistry
    backend: WorkerBackend


@dataclass(frozen=True)
class CallContext:
    components: Components
    conn: Connection
    request_id: int | str | None = None


@dataclass(frozen=True)
class Frames:
    """A reply made of pre-encoded frames (``str``, or UTF-8 ``bytes``), queued in order in one step;
    ``then`` runs right after."""

    frames: Sequence[str | bytes]
    then: Callable[[], None] | None = None


Reply = dict[str, Any] | Frames
Handler = Callable[[CallContext, dict[str, Any]], Awaitable[Reply]]


def limits(config: Config) -> dict[str, Any]:
    """The limits ``gateway.info`` reports: the knobs a client can run into."""
    names = (
        "max_message_bytes",
        "max_sessions",
        "max_sessions_per_connection",
        "max_queued_prompts",
        "max_terminals",
        "max_connections",
        "rate_per_s",
        "rate_burst",
        "replay_max_events",
        "replay_max_bytes",
        "grace_s",
        "idle_ttl_s",
        "interrupt_grace_s",
        "slash_timeout_s",
        "max_title_chars",
        "events_page_max_bytes",
        "events_page_max_events",
    )
    return {name: getattr(config, name) for name in names}


async def _info(ctx: CallContext, params: dict[str, Any]) -> Reply:
    c = ctx.components
    return {
        "version": __version__,
        "protocol": PROTOCOL_VERSION,
        "agents": c.backend.known_agents(),
        "default_agent": c.config.agent,
        "platform": sys.platform,
        "limits": limits(c.config),
    }


async def _ping(ctx: CallContext, params: dict[str, Any]) -> Reply:
    return {"ok": True}


async def _create(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.sessions.create(ctx.conn, p)


async def _resume(ctx: CallContext, p: dict[str, Any]) -> Reply:
    sessions = ctx.components.sessions
    frames = await sessions.resume(ctx.conn, ctx.request_id, p)
    return Frames(frames, lambda: sessions.after_resume(p["session_id"]))


async def _events_since(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return Frames([await ctx.components.sessions.events_since_text(ctx.request_id, p)])


async def _ack(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return ctx.components.sessions.ack(ctx.conn, p["session_id"], p["seq"])


async def _close(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.sessions.close(p["session_id"], "client")


async def _active_list(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return ctx.components.sessions.active_list()


async def _list(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.sessions.list_stored(p.get("limit", 100), p.get("include_closed", True))


async def _delete(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.sessions.delete(p["session_id"])


async def _interrupt(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.sessions.interrupt(p["session_id"])


async def _submit(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return ctx.components.sessions.submit(p["session_id"], p["text"])


async def _slash(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.sessions.slash_exec(p["session_id"], p["command"])


async def _terminal_open(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.terminals.open(p)


async def _terminal_resize(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.terminals.resize(p)


async def _terminal_close(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return await ctx.components.terminals.close(p)


async def _terminal_list(ctx: CallContext, p: dict[str, Any]) -> Reply:
    return ctx.components.terminals.list_terminals()


HANDLERS: dict[str, Handler] = {
    Method.PING: _ping,
    Method.INFO: _info,
    Method.SESSION_CREATE: _create,
    Method.SESSION_RESUME: _resume,
    Method.SESSION_EVENTS_SINCE: _events_since,
    Method.SESSION_ACK: _ack,
    Method.SESSION_CLOSE: _close,
    Method.SESSION_ACTIVE_LIST: _active_list,
    Method.SESSION_LIST: _list,
    Method.SESSION_DELETE: _delete,
    Method.SESSION_INTERRUPT: _interrupt,
    Method.PROMPT_SUBMIT: _submit,
    Method.SLASH_EXEC: _slash,
    Method.TERMINAL_OPEN: _terminal_open,
    Method.TERMINAL_RESIZE: _terminal_resize,
    Method.TERMINAL_CLOSE: _terminal_close,
    Method.TERMINAL_LIST: _terminal_list,
}
assert set(HANDLERS) == set(rpc.METHOD_PARAMS), "every method in rpc.METHOD_PARAMS needs a handler"
