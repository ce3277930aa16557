"""No process escapes its session (issue 13 section 1): whatever a command did to its process group or
session (``setsid``, ``setpgid``, a double fork whose middle parent exits at once), it ends with the
session, for every way a session ends: close, disconnect, grace expiry, SIGTERM and SIGKILL of the gateway.

Each escape runs ``sleep 6001.<random>`` so the test finds its processes by a marker in the command line
(never by ancestry: an escaped process is, by construction, no longer where one would look).  One gateway
per ending runs every pattern at once, to keep the suite short.
"""

from __future__ import annotations

import contextlib
import enum
import os
import random
import sys
import time
from collections.abc import Callable

import psutil
import pytest
import websockets

from support import GatewayProcess, RpcClient, async_wait_for
from gateway.wire import SUBPROTOCOL

pytestmark = pytest.mark.timeout(120)

#: Started from the ``shell`` agent (``/bin/sh -c``); ``{m}`` is the marker, e.g. ``6001.48213``.
SHELL_ESCAPES = {
    "setsid_bg": "setsid sleep {m} >/dev/null 2>&1 &",
    "setpgid_exec": (f"{sys.executable} -c \"import os; os.setpgid(0, 0); os.execvp('sleep', ['sleep', '{{m}}'])\""
                     " >/dev/null 2>&1 &"),
    "setsid_double_fork": "setsid sh -c 'sleep {m} & exit 0' >/dev/null 2>&1 &",
}
#: Typed into an interactive bash on a terminal.
TERMINAL_ESCAPES = {
    "setsid_bg": "setsid sleep {m} &",
    "setsid_fork": "setsid -f sleep {m}",
    "subshell_setsid": "( setsid sleep {m} & )",
    "setsid_sh_exit": "setsid sh -c 'sleep {m} & exit'",
}
BASH = ["bash", "--norc", "--noprofile", "-i"]
APPEAR_S = 15.0
GONE_S = 15.0


class Ending(enum.Enum):
    CLOSE = "close"
    DISCONNECT = "disconnect"
    GRACE_EXPIRY = "grace_expiry"
    GATEWAY_SIGTERM = "gateway_sigterm"
    GATEWAY_SIGKILL = "gateway_sigkill"


def new_marker() -> str:
    return f"6001.{random.randrange(10**7, 10**8)}"


def marked(marker: str) -> list[psutil.Process]:
    """Live processes whose command line carries ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
    return found


def escaped_from(proc: psutil.Process, sid: int, pgid: int) -> bool:
    """True when ``proc`` left the group ``pgid`` or the session ``sid`` (what ``killpg`` relies on)."""
    try:
        return os.getsid(proc.pid) != sid or os.getpgid(proc.pid) != pgid
    except OSError:
        return False


def kill_strays(markers: list[str]) -> None:
    for marker in markers:
        for proc in marked(marker):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def gateway_args(ending: Ending) -> list[str]:
    if ending is Ending.GRACE_EXPIRY:
        return ["--grace-s", "1", "--terminal-grace-s", "1"]
    if ending is Ending.DISCONNECT:
        return ["--terminal-grace-s", "0.5"]
    return []


class Terminal:
    """One interactive bash on a terminal, typed into over its ``/pty`` socket."""

    def __init__(self, ws: websockets.ClientConnection, opened: dict) -> None:
        self.ws = ws
        self.opened = opened
        self.output = b""

    async def run(self, line: str, done: bytes, timeout: float = 15.0) -> None:
        await self.ws.send(line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while done not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {done!r} in {self.output[-500:]!r}"
            self.output += await asyncio_wait_for(self.ws.recv(), remaining)


async def asyncio_wait_for(awaitable, timeout: float):  # type: ignore[no-untyped-def]
    import asyncio

    data = await asyncio.wait_for(awaitable, timeout)
    return data if isinstance(data, bytes) else data.encode()


async def start_escapes(gw: GatewayProcess, client: RpcClient, ending: Ending,
                        stack: contextlib.AsyncExitStack) -> tuple[list[str], list[Terminal]]:
    """Run every escape pattern (one session per shell pattern, one terminal per terminal pattern) and
    wait until each marked process runs outside the group or session that started it."""
    markers: list[str] = []
    terminals: list[Terminal] = []
    on_disconnect = ending is Ending.DISCONNECT
    for name, template in SHELL_ESCAPES.items():
        marker = new_marker()
        markers.append(marker)
        created = await client.call("session.create", agent="shell", close_on_disconnect=on_disconnect,
                                    title=name)
        done = await client.run_turn(created["session_id"], template.format(m=marker))
        assert done["status"] == "ok", (name, done)
        worker = created["worker_pid"]
        sid = os.getsid(worker)
        await async_wait_for(lambda: (ps := marked(marker)) and all(escaped_from(p, sid, worker) for p in ps),
                             APPEAR_S, interval=0.1, what=f"{name} to run outside the worker's group")
    for name, template in TERMINAL_ESCAPES.items():
        marker = new_marker()
        markers.append(marker)
        opened = await client.call("terminal.open", argv=BASH)
        ws = await stack.enter_async_context(
            websockets.connect(gw.url(opened["path"]), subprotocols=[SUBPROTOCOL], max_size=None))
        term = Terminal(ws, opened)
        terminals.append(term)
        await term.run(template.format(m=marker) + "\necho STARTED-$((40+2))", b"STARTED-42")
        sid = opened["pid"]
        await async_wait_for(lambda: (ps := marked(marker)) and all(escaped_from(p, sid, sid) for p in ps),
                             APPEAR_S, interval=0.1, what=f"terminal {name} to leave the terminal's session")
    return markers, terminals


async def end_sessions(ending: Ending, gw: GatewayProcess, client: RpcClient, terminals: list[Terminal],
                       stack: contextlib.AsyncExitStack) -> None:
    if ending is Ending.CLOSE:
        for session in (await client.call("session.active_list"))["sessions"]:
            assert (await client.call("session.close", session_id=session["session_id"]))["closed"] is True
        for term in terminals:
            assert await client.call("terminal.close", terminal_id=term.opened["terminal_id"]) == {"closed": True}
    elif ending in (Ending.DISCONNECT, Ending.GRACE_EXPIRY):
        await stack.aclose()  # every socket: the RPC connection and each /pty
    elif ending is Ending.GATEWAY_SIGTERM:
        assert gw.stop() == 0
    else:
        gw.proc.kill()
        gw.proc.wait(10)


@pytest.mark.parametrize("ending", list(Ending), ids=lambda e: e.value)
async def test_no_escaped_process_outlives_its_session(gateway_factory: Callable[..., GatewayProcess],
                                                      ending: Ending) -> None:
    gw = gateway_factory(*gateway_args(ending))
    markers: list[str] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(RpcClient.connect(gw.url()))
            markers, terminals = await start_escapes(gw, client, ending, stack)
            assert len(markers) == len(SHELL_ESCAPES) + len(TERMINAL_ESCAPES)
            await end_sessions(ending, gw, client, terminals, stack)

            def survivors() -> list[tuple[str, int]]:
                return [(m, p.pid) for m in markers for p in marked(m)]

            try:
                await async_wait_for(lambda: not survivors(), GONE_S, interval=0.2,
                                     what="every escaped process to end")
            except AssertionError:
                raise AssertionError(f"still running: {survivors()}") from None
    finally:
        kill_strays(markers)
