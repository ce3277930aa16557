"""Handshake checks of PROTOCOL section 3 as pure functions."""

from __future__ import annotations

import pytest

from gateway.auth import check_handshake, cookie_name, cookie_value, tokens_match
from gateway.config import Config

LOOP = Config(host="127.0.0.1", token="sekrit")
PUBLIC = Config(host="0.0.0.0", token="sekrit", allow_origin="https://dash.example.com")


def check(cfg: Config, headers: dict, query: dict | None = None, protos: tuple = ()) -> str | None:
    return check_handshake(cfg, headers, query or {}, protos).reason


def test_token_forms() -> None:
    host = {"host": "127.0.0.1:8765"}
    assert check(LOOP, host, {"token": "sekrit"}) is None
    assert check(LOOP, {**host, "authorization": "Bearer sekrit"}) is None
    assert check(LOOP, {**host, "cookie": "other=1; wg_token=sekrit"}) is None
    verdict = check_handshake(LOOP, host, {}, ("worker-gateway.v1", "worker-gateway.token.sekrit"))
    assert verdict.accepted and verdict.subprotocol == "worker-gateway.v1"


@pytest.mark.parametrize("headers, query, protos", [
    ({"host": "127.0.0.1:1"}, {}, ()),
    ({"host": "127.0.0.1:1"}, {"token": "wrong"}, ()),
    ({"host": "127.0.0.1:1", "authorization": "Basic sekrit"}, {}, ()),
    ({"host": "127.0.0.1:1", "cookie": "wg_token=nope"}, {}, ()),
    ({"host": "127.0.0.1:1"}, {}, ("worker-gateway.token.sekrit",)),  # token without the v1 protocol
])
def test_missing_or_wrong_token_rejected(headers, query, protos) -> None:
    assert check(LOOP, headers, query, protos) == "token"


def test_host_must_be_loopback_on_loopback_bind() -> None:
    assert check(LOOP, {"host": "evil.example:8765"}, {"token": "sekrit"}) == "host"
    assert check(LOOP, {}, {"token": "sekrit"}) == "host"
    assert check(LOOP, {"host": "localhost:8765"}, {"token": "sekrit"}) is None
    assert check(LOOP, {"host": "[::1]:8765"}, {"token": "sekrit"}) is None
    assert check(PUBLIC, {"host": "gw.example.com"}, {"token": "sekrit"}) is None


@pytest.mark.parametrize("cfg, origin, host, ok", [
    (LOOP, "http://127.0.0.1:8765", "127.0.0.1:8765", True),
    (LOOP, "http://127.0.0.1:9999", "127.0.0.1:8765", False),
    (LOOP, "http://evil.example", "127.0.0.1:8765", False),
    (LOOP, "null", "127.0.0.1:8765", True),
    (LOOP, "file://", "127.0.0.1:8765", True),
    (PUBLIC, "null", "gw.example.com", False),
    (PUBLIC, "file://", "gw.example.com", False),
    (PUBLIC, "https://gw.example.com", "gw.example.com", True),
    (PUBLIC, "https://dash.example.com", "gw.example.com", True),
    (PUBLIC, "https://other.example.com", "gw.example.com", False),
])
def test_origin(cfg: Config, origin: str, host: str, ok: bool) -> None:
    reason = check(cfg, {"host": host, "origin": origin}, {"token": "sekrit"})
    assert (reason is None) is ok, reason


def test_tokens_match_is_exact() -> None:
    assert tokens_match("abc", "abc")
    assert not tokens_match("abcd", "abc")
    assert not tokens_match(None, "abc")
    assert not tokens_match("\udcff", "abc")  # a lone surrogate from a bad cookie must not raise


def test_opaque_origins_need_listing_when_auth_is_off() -> None:
    open_cfg = Config(host="127.0.0.1", no_auth=True)
    assert check(open_cfg, {"host": "127.0.0.1:8765", "origin": "null"}) == "origin"
    assert check(open_cfg, {"host": "127.0.0.1:8765", "origin": "file://"}) == "origin"
    listed = Config(host="127.0.0.1", no_auth=True, allow_origin="null")
    assert check(listed, {"host": "127.0.0.1:8765", "origin": "null"}) is None
    assert check(open_cfg, {"host": "127.0.0.1:8765", "origin": "http://127.0.0.1:8765"}) is None


@pytest.mark.parametrize("origin, scheme, ok", [
    ("http://127.0.0.1:8765", "ws", True),
    ("http://127.0.0.1:8765", "http", True),
    ("https://127.0.0.1:8765", "ws", False),  # an https page is not same-origin with an http bind
    ("https://127.0.0.1:8765", "wss", True),  # ...but is behind TLS (X-Forwarded-Proto from a trusted proxy)
    ("http://127.0.0.1:8765", "wss", False),
])
def test_origin_scheme_must_match_the_request(origin: str, scheme: str, ok: bool) -> None:
    verdict = check_handshake(LOOP, {"host": "127.0.0.1:8765", "origin": origin}, {"token": "sekrit"}, scheme=scheme)
    assert verdict.accepted is ok, verdict


def test_every_rejection_says_what_to_change() -> None:
    host = check_handshake(LOOP, {"host": "gw.example.com"}, {"token": "sekrit"})
    assert host.reason == "host" and "gw.example.com" in host.detail and "Host: 127.0.0.1" in host.detail
    origin = check_handshake(LOOP, {"host": "127.0.0.1:1", "origin": "http://evil.example"}, {"token": "sekrit"})
    assert origin.reason == "origin" and "evil.example" in origin.detail and "--allow-origin" in origin.detail
    token = check_handshake(LOOP, {"host": "127.0.0.1:1"}, {"token": "Guess-9f3a"})
    assert token.reason == "token" and "Bearer" in token.detail and "Guess-9f3a" not in token.detail
    long = check_handshake(LOOP, {"host": "x" * 5000}, {"token": "sekrit"})
    assert len(long.detail) < 600  # a client's header is echoed bounded


def test_dashboard_cookie_is_scoped_and_opaque() -> None:
    assert cookie_name(8765) == "wg_token_8765"
    assert cookie_name(8765, secure=True) == "__Host-wg_token_8765"
    assert cookie_name(8765, secure=True, root_path="/gw") == "__Secure-wg_token_8765"
    value = cookie_value("sekrit")
    assert "sekrit" not in value and value == cookie_value("sekrit") and value != cookie_value("sekrit2")
    host = {"host": "127.0.0.1:8765"}
    for name in ("wg_token_8765", "__Host-wg_token_8765", "__Secure-wg_token_8765"):
        assert check_handshake(LOOP, {**host, "cookie": f"{name}={value}"}, {}, server_port=8765).accepted, name
    # Another gateway's cookie, the handle used as a token, and the token under the new name are refused.
    assert check_handshake(LOOP, {**host, "cookie": f"wg_token_9999={value}"}, {}, server_port=8765).reason == "token"
    assert check_handshake(LOOP, host, {"token": value}, server_port=8765).reason == "token"
    assert check_handshake(LOOP, {**host, "cookie": "wg_token_8765=sekrit"}, {}, server_port=8765).reason == "token"
