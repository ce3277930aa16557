"""The HTTP/WebSocket edge against a real gateway: rejections that say why, the scoped dashboard cookie,
proxy headers, a path prefix, and malformed paths."""

from __future__ import annotations

import asyncio
import http.client
import json

import pytest
import websockets

from support import TOKEN, GatewayProcess, RpcClient, wait_for
from gateway.auth import cookie_name, cookie_value


def get(gw: GatewayProcess, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    resp.body = resp.read()  # type: ignore[attr-defined]
    conn.close()
    return resp


async def rejection(url: str, **kwargs) -> tuple[int, str]:
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with websockets.connect(url, **kwargs):
            pass
    response = exc.value.response
    return response.status_code, response.body.decode()


async def test_rejected_handshake_says_which_check_failed(gateway) -> None:
    base = f"ws://127.0.0.1:{gateway.port}/ws"
    status, body = await rejection(base + "?token=Guess-1234")
    assert status == 403 and "token check failed" in body and "Guess-1234" not in body
    status, body = await rejection(base + f"?token={TOKEN}", origin="http://evil.example")
    assert status == 403 and "origin check failed" in body and "evil.example" in body
    status, body = await rejection(base + f"?token={TOKEN}", additional_headers={"Host": "x"})
    assert status == 403 and "more than one host header" in body
    # One line per rejection in the log, naming the check (and never the presented token).
    wait_for(lambda: gateway.stderr().count("handshake rejected") >= 3, 10, what="the rejection log lines")
    lines = [line for line in gateway.stderr().splitlines() if "handshake rejected" in line]
    assert any("token check failed" in line for line in lines)
    assert any("origin check failed" in line for line in lines)
    assert all("Guess-1234" not in line and TOKEN not in line for line in lines)


async def test_https_origin_is_refused_on_an_http_bind(gateway) -> None:
    status, body = await rejection(gateway.url(), origin=f"https://127.0.0.1:{gateway.port}")
    assert status == 403 and "origin check failed" in body
    async with websockets.connect(gateway.url(), origin=f"http://127.0.0.1:{gateway.port}") as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["params"]["type"] == "gateway.ready"


async def test_dashboard_cookie_is_per_port_and_not_the_token(gateway) -> None:
    resp = get(gateway, f"/?token={TOKEN}")
    assert resp.status == 200
    set_cookie = resp.getheader("Set-Cookie")
    name = cookie_name(gateway.port)
    assert set_cookie.startswith(f"{name}={cookie_value(TOKEN)};"), set_cookie
    assert TOKEN not in set_cookie
    attrs = {a.strip().split("=")[0].lower(): a for a in set_cookie.split(";")[1:]}
    assert "httponly" in attrs and attrs["samesite"].strip().lower() == "samesite=strict"
    assert attrs["path"].strip().lower() == "path=/"
    cookie = set_cookie.split(";")[0]
    # The cookie alone authenticates the page's sockets and assets...
    async with RpcClient.connect(f"ws://127.0.0.1:{gateway.port}/ws", additional_headers={"Cookie": cookie}) as c:
        assert await c.call("gateway.ping") == {"ok": True}
    assert get(gateway, "/static/js/main.js", {"Cookie": cookie}).status == 200
    # ...but its value is not a token.
    assert get(gateway, f"/metrics?token={cookie_value(TOKEN)}").status == 403


def test_malformed_static_paths_are_404(gateway) -> None:
    for path in ("/static/%00", "/static/a%00b.js", "/static/" + "x" * 5000, "/static/../pyproject.toml",
                 "/static/%2e%2e/pyproject.toml"):
        resp = get(gateway, path + f"?token={TOKEN}")
        assert resp.status == 404, (path, resp.status)
    assert "Traceback" not in gateway.stderr()


async def test_root_path_serves_page_and_sockets_under_the_prefix(gateway_factory) -> None:
    gw = gateway_factory("--root-path", "/gw/")
    assert f"url=http://127.0.0.1:{gw.port}/gw/" in gw.ready_line
    page = get(gw, f"/gw/?token={TOKEN}")
    assert page.status == 200 and b"<html" in page.body
    assert "Path=/gw/" in page.getheader("Set-Cookie")
    # The proxy may strip the prefix or forward it: both reach the same routes.
    for path in ("/gw/ws", "/ws"):
        async with RpcClient.connect(f"ws://127.0.0.1:{gw.port}{path}?token={TOKEN}") as client:
            assert await client.call("gateway.ping") == {"ok": True}
    assert get(gw, f"/gw/static/js/main.js?token={TOKEN}").status == 200
    bare = get(gw, "/gw?x=1")
    assert bare.status == 308 and bare.getheader("Location") == "/gw/?x=1"


def test_bad_root_path_is_a_usage_error() -> None:
    import subprocess
    import sys

    from support import ROOT
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--root-path", "/a b"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--root-path" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("trust, logged", [("127.0.0.1,::1", "203.0.113.5"), ("none", "127.0.0.1")])
async def test_client_address_from_trusted_proxy_headers(gateway_factory, trust: str, logged: str) -> None:
    gw = gateway_factory("--forwarded-allow-ips", trust)
    await rejection(gw.url(token=False), additional_headers={"X-Forwarded-For": "203.0.113.5"})
    wait_for(lambda: "handshake rejected" in gw.stderr(), 10, what="the rejection log line")
    line = next(line for line in gw.stderr().splitlines() if "handshake rejected" in line)
    assert f"from {logged}:" in line, line
