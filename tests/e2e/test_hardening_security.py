"""The token is never logged except in the one start-up URL line, and it does not leak to agent code
(docs/security.md, "Token handling")."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
import websockets

from support import GatewayProcess, RpcClient, wait_for

TOKEN = "Sekrit-Tok3n-for-log-checks-0123456789"
WRONG = "Wr0ng-but-maybe-someones-real-token-9876"


async def every_handshake(gw: GatewayProcess) -> None:
    """Accepted handshakes with every token form, rejected ones with a wrong token in every form, and the
    HTTP endpoints that take a token."""
    base = f"ws://127.0.0.1:{gw.port}/ws"

    def forms(token: str) -> list[dict]:
        return [dict(uri=f"{base}?token={token}"),
                dict(uri=base, additional_headers={"Authorization": f"Bearer {token}"}),
                dict(uri=base, subprotocols=["worker-gateway.v1", f"worker-gateway.token.{token}"]),
                dict(uri=base, additional_headers={"Cookie": f"wg_token={token}"})]

    for form in forms(TOKEN):
        async with websockets.connect(**form) as ws:
            await asyncio.wait_for(ws.recv(), 10)
    for form in forms(WRONG):
        with pytest.raises(websockets.InvalidStatus) as rejected:
            async with websockets.connect(**form):
                pass
        assert rejected.value.response.status_code == 403
    for path, status in [(f"/?token={TOKEN}", 200), (f"/metrics?token={TOKEN}", 200),
                         (f"/metrics?token={WRONG}", 403), (f"/?token={WRONG}", 403)]:
        try:
            with urllib.request.urlopen(gw.http(path), timeout=5) as resp:
                assert resp.status == status
        except urllib.error.HTTPError as exc:
            assert exc.code == status, path


def token_lines(text: str, secret: str) -> list[str]:
    return [line for line in text.splitlines() if secret in line]


async def test_token_is_logged_only_in_the_startup_line(gateway_factory) -> None:
    gw = gateway_factory(token=TOKEN)
    await every_handshake(gw)
    async with RpcClient.connect(gw.url()) as client:  # and a session, for good measure
        sid = (await client.call("session.create"))["session_id"]
        assert (await client.run_turn(sid, "hi"))["status"] == "ok"
    gw.stop()
    stderr = gw.stderr()
    assert "[REDACTED]" in stderr  # uvicorn's "WebSocket /ws?token=..." lines are there, masked
    lines = token_lines(stderr, TOKEN)
    assert len(lines) == 1 and "dashboard:" in lines[0] and lines[0].startswith("worker-gateway: serving on"), lines
    assert token_lines(stderr, WRONG) == []
    assert TOKEN not in gw.ready_line


async def test_token_is_not_logged_at_debug_level(gateway_factory) -> None:
    gw = gateway_factory("--log-level", "debug", token=TOKEN)
    await every_handshake(gw)
    gw.stop()
    stderr = gw.stderr()
    leaks = token_lines(stderr, TOKEN)[1:] + token_lines(stderr, WRONG)
    assert not leaks, leaks


async def test_agent_workers_do_not_inherit_the_token(gateway_factory) -> None:
    gw = gateway_factory(token=None, env={"WORKER_GATEWAY_TOKEN": TOKEN})
    gw.token = TOKEN
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create", agent="shell"))["session_id"]
        done = await client.run_turn(sid, 'echo "seen=[$WORKER_GATEWAY_TOKEN]"')
        assert done["status"] == "ok"
        output = "".join(e["payload"]["text"] for e in client.session_events(sid, "tool.output"))
    assert output.strip() == "seen=[]"


async def test_no_auth_refuses_opaque_origins(gateway_factory) -> None:
    """With auth off, the Origin and Host checks are all that stand between a web page and a shell; a
    sandboxed iframe on any site has ``Origin: null`` and connects to 127.0.0.1, so opaque origins must be
    refused unless explicitly allowed."""
    gw = gateway_factory("--no-auth", token=None)
    accepted = []
    for origin in ("null", "file://"):
        try:
            async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", origin=origin) as ws:
                await asyncio.wait_for(ws.recv(), 10)
                accepted.append(origin)
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 403
    assert accepted == []
    # A same-origin page (the dashboard itself) still works without a token.
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", origin=f"http://127.0.0.1:{gw.port}") as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["params"]["type"] == "gateway.ready"


async def test_invalid_utf8_frame_logs_one_short_line(gateway_factory) -> None:
    """Issue 13 section 6: a client's invalid UTF-8 frame closes its connection with 1007 and costs the log
    one short line (uvicorn logged a 580-byte traceback per frame); a flood of them is rate-limited."""
    from websockets.frames import Frame, Opcode

    gw = gateway_factory(token=TOKEN)
    for _ in range(3):
        async with websockets.connect(gw.url()) as ws:
            await asyncio.wait_for(ws.recv(), 10)
            ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe not utf-8"))
            ws.send_data()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    wait_for(lambda: gw.stderr().count("invalid UTF-8") >= 3, 10, what="the three log lines")
    lines = [line for line in gw.stderr().splitlines() if "invalid UTF-8" in line]
    assert len(lines) == 3 and all(len(line) < 200 for line in lines), lines
    assert "Traceback" not in gw.stderr()


def test_rate_limited_log_counts_what_it_drops(caplog) -> None:
    import logging

    from gateway.ratelog import RateLimitedLog

    now = [0.0]
    log = RateLimitedLog(logging.getLogger("test.ratelog"), rate_per_s=1.0, burst=2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.ratelog"):
        written = [log.log(logging.WARNING, "line %d", i) for i in range(5)]
        now[0] += 1.0
        assert log.log(logging.WARNING, "after a second")
    assert written == [True, True, False, False, False]
    assert caplog.messages[-1] == "after a second (3 similar lines suppressed)"


def test_token_spans_in_argv_and_environment_blocks() -> None:
    from gateway.procfs import memory_bounds, secret_spans

    argv = b"python\0-m\0gateway\0--token\0T0k\0--token=T0k\0--other\0xT0kx\0"
    assert [argv[o:o + n] for o, n in secret_spans(argv, b"T0k")] == [b"T0k", b"T0k"]
    env = b"PATH=/bin:T0k\0WORKER_GATEWAY_TOKEN=other\0T0k=1\0"
    spans = secret_spans(env, b"T0k", b"WORKER_GATEWAY_TOKEN")
    assert spans == [(env.index(b"=other\0") + 1, 5)]  # the variable's value (whatever it is), nothing else
    stat = "123 (a b) c) S " + " ".join(str(n) for n in range(4, 53))
    assert memory_bounds(stat) == (48, 49, 50, 51)
    assert memory_bounds("1 (x) S 1 2") is None


@pytest.mark.parametrize("via", ["flag", "flag=", "env", "flag+env"])
def test_token_is_not_readable_from_proc(gateway_factory, via: str) -> None:
    """Issue 13 section 6: other local users can read /proc/<pid>/cmdline; agents and shells running as the
    user could read /proc/<gateway>/environ."""
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux /proc only")
    if via == "env":
        gw = gateway_factory(token=None, env={"WORKER_GATEWAY_TOKEN": TOKEN})
    elif via == "flag+env":  # the flag wins, and the environment's (other) token is erased as well
        gw = gateway_factory(token=TOKEN, env={"WORKER_GATEWAY_TOKEN": WRONG})
    elif via == "flag=":
        gw = gateway_factory(f"--token={TOKEN}", token=None)
    else:
        gw = gateway_factory(token=TOKEN)
    for name in ("cmdline", "environ"):
        with open(f"/proc/{gw.pid}/{name}", "rb") as f:
            exposed = f.read()
        assert TOKEN.encode() not in exposed and WRONG.encode() not in exposed, name
    # And the token still works.
    async def ping() -> dict:
        async with RpcClient.connect(f"ws://127.0.0.1:{gw.port}/ws?token={TOKEN}") as client:
            return await client.call("gateway.ping")
    assert asyncio.run(ping()) == {"ok": True}
