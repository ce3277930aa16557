"""Serving under a path prefix: the pure path mapping."""

from __future__ import annotations

import pytest

from gateway.rootpath import normalize_root_path, prefixed


@pytest.mark.parametrize("raw, expected", [("", ""), ("/", ""), ("gw", "/gw"), ("/gw/", "/gw"), ("/a/b", "/a/b")])
def test_normalize_root_path(raw: str, expected: str) -> None:
    assert normalize_root_path(raw) == expected


def test_prefixed_accepts_stripped_and_unstripped_paths() -> None:
    assert prefixed("/ws", "/gw") == "/gw/ws"  # the proxy stripped the prefix (or a direct request)
    assert prefixed("/gw/ws", "/gw") == "/gw/ws"  # the proxy forwarded it unchanged
    assert prefixed("/gwx/ws", "/gw") == "/gw/gwx/ws"  # a longer name is not the prefix
    assert prefixed("/ws", "") == "/ws"
