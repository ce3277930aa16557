"""Handshake checks of PROTOCOL section 3 as pure functions."""

from __future__ import annotations

import pytest

from gateway.auth import check_handshake, tokens_match
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
