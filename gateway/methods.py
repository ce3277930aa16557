"""The JSON-RPC method table: which coroutine answers which method.

Parameters are validated centrally (``rpc.METHOD_PARAMS``) before a handler runs, so handlers receive
well-typed params.  A handler returns the result object, or a zero-argument callable when it must send its
response together with more frames in one step (``session.resume``: response, then replay).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from gateway import PROTOCOL_VERSION, __version__, rpc

if TYPE_CHECKING:
    from gateway.app import GatewayState
    from gateway.connection import Connection


@dataclass(frozen=True)
class CallContext:
    state: GatewayState
    conn: Connection
    request_id: int | str | None = None


Handler = Callable[[CallContext, dict[str, Any]], Awaitable[Any]]


async def _info(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    config = ctx.state.config
    assert ctx.state.supervisor is not None
    return {
        "version": __version__,
        "protocol": PROTOCOL_VERSION,
        "agents": ctx.state.supervisor.known_agents(),
        "default_agent": config.agent,
        "platform": sys.platform,
        "limits": {
            "max_message_bytes": config.max_message_bytes,
            "max_sessions": config.max_sessions,
            "max_sessions_per_connection": config.max_sessions_per_connection,
            "max_queued_prompts": config.max_queued_prompts,
            "max_terminals": config.max_terminals,
            "max_connections": config.max_connections,
            "rate_per_s": config.rate_per_s,
            "rate_burst": config.rate_burst,
            "replay_max_events": config.replay_max_events,
            "replay_max_bytes": config.replay_max_bytes,
            "grace_s": config.grace_s,
            "idle_ttl_s": config.idle_ttl_s,
            "interrupt_grace_s": config.interrupt_grace_s,
            "slash_timeout_s": config.slash_timeout_s,
        },
    }


async def _ping(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


def _sessions(ctx: CallContext):  # type: ignore[no-untyped-def]
    assert ctx.state.sessions is not None
    return ctx.state.sessions


def _terminals(ctx: CallContext):  # type: ignore[no-untyped-def]
    assert ctx.state.terminals is not None
    return ctx.state.terminals


async def _create(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return await _sessions(ctx).create(ctx.conn, p)


async def _resume(ctx: CallContext, p: dict[str, Any]) -> Callable[[], None]:
    return _sessions(ctx).resume(ctx.conn, ctx.request_id, p)


async def _events_since(ctx: CallContext, p: dict[str, Any]) -> Callable[[], None]:
    text = _sessions(ctx).events_since_text(ctx.request_id, p)
    return lambda: ctx.conn.send(text)


async def _close(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return await _sessions(ctx).close(p["session_id"], "client")


async def _active_list(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return _sessions(ctx).active_list()


async def _interrupt(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return await _sessions(ctx).interrupt(p["session_id"])


async def _submit(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return _sessions(ctx).submit(p["session_id"], p["text"])


async def _slash(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return await _sessions(ctx).slash_exec(p["session_id"], p["command"])


async def _terminal_open(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return await _terminals(ctx).open(p)


async def _terminal_resize(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return await _terminals(ctx).resize(p)


async def _terminal_close(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return await _terminals(ctx).close(p)


async def _terminal_list(ctx: CallContext, p: dict[str, Any]) -> dict[str, Any]:
    return _terminals(ctx).list_terminals()


HANDLERS: dict[str, Handler] = {
    "gateway.ping": _ping,
    "gateway.info": _info,
    "session.create": _create,
    "session.resume": _resume,
    "session.events.since": _events_since,
    "session.close": _close,
    "session.active_list": _active_list,
    "session.interrupt": _interrupt,
    "prompt.submit": _submit,
    "slash.exec": _slash,
    "terminal.open": _terminal_open,
    "terminal.resize": _terminal_resize,
    "terminal.close": _terminal_close,
    "terminal.list": _terminal_list,
}
assert set(HANDLERS) == set(rpc.METHOD_PARAMS), "every method in rpc.METHOD_PARAMS needs a handler"
