"""Test helpers for the edge: a WebSocket client in a subprocess that can be SIGSTOPped (a peer that
vanished without a FIN), and the gateway's view of its sessions."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap

from support import ROOT, GatewayProcess, RpcClient, read_line

# A client that stops answering pings: a subprocess we SIGSTOP (so its kernel socket stays open and nothing
# answers), as a browser behind a tunnel that vanished.  It creates a session, says so, then idles.
_STOPPABLE_CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    import websockets

    async def main(url, header):
        extra = {header: "203.0.113.9"} if header else {}
        async with websockets.connect(url, additional_headers=extra, ping_interval=None) as ws:
            ready = json.loads(await ws.recv())
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.create", "params": {}}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == 1:
                    print(json.dumps({"ping": ready["params"]["payload"]["ping"],
                                      "session_id": msg["result"]["session_id"]}), flush=True)
                    break
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
""")


class StoppableClient:
    """Its stdout's first line: ``{"ping": <gateway.ready ping>, "session_id": ...}``."""

    def __init__(self, url: str, header: str = "") -> None:
        args = [sys.executable, "-c", _STOPPABLE_CLIENT, url] + ([header] if header else [])
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.hello = json.loads(read_line(self.proc, 30.0))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


async def active(gw: GatewayProcess) -> dict[str, dict]:
    async with RpcClient.connect(gw.url()) as observer:
        sessions = (await observer.call("session.active_list"))["sessions"]
    return {s["session_id"]: s for s in sessions}


async def wait_detached(gw: GatewayProcess, session_id: str, within: float) -> float:
    """Poll until the session is no longer attached (or gone); return the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        sessions = await active(gw)
        if session_id not in sessions or not sessions[session_id]["attached"]:
            return loop.time() - started
        assert loop.time() - started < within, f"session {session_id} still attached after {within}s"
        await asyncio.sleep(0.1)


async def wait_reaped(gw: GatewayProcess, session_id: str, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while session_id in await active(gw):
        assert loop.time() < deadline, f"detached idle session {session_id} not reaped within {within}s"
        await asyncio.sleep(0.1)
