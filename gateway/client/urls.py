"""Where the client connects: URL normalization and the loopback test behind its keepalive default."""

from __future__ import annotations

import ipaddress
import urllib.parse


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and any loopback address (127.0.0.0/8, ``::1``)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def normalize_url(url: str) -> str:
    """``http(s)://host:port`` becomes ``ws(s)://host:port/ws``; a ws URL without a path gets ``/ws``."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}: use ws://, wss://, http:// or https://")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def without_token(url: str) -> str:
    """The URL with any ``token=`` query parameter removed, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("token="))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
