"""Handshake checks (PROTOCOL section 3): token, Origin, and Host on loopback binds.

Pure functions of the request's headers, query and the config, so every rejection case is unit-testable;
the app calls :func:`check_websocket` before ``accept`` and closes (HTTP 403) on a rejection.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from gateway.config import Config, is_loopback_host
from gateway.wire import COOKIE_NAME, SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX


@dataclass(frozen=True)
class Verdict:
    """Outcome of a handshake check: ``reason`` is None when accepted."""

    reason: str | None
    subprotocol: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def tokens_match(given: str | None, expected: str) -> bool:
    """Constant-time comparison (no early exit that would leak the token's prefix through timing)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def _cookie_token(cookie_header: str | None) -> str | None:
    if not cookie_header:
        return None
    jar = SimpleCookie()
    try:
        jar.load(cookie_header)
    except Exception:
        return None
    morsel = jar.get(COOKIE_NAME)
    return morsel.value if morsel else None


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def presented_tokens(
    headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Sequence[str] = ()
) -> tuple[list[str], str | None]:
    """Every token the request presents (query, bearer, subprotocol pair, cookie), and the subprotocol the
    server must select when the client used the subprotocol form."""
    found: list[str] = []
    if "token" in query:
        found.append(query["token"])
    bearer = _bearer_token(headers.get("authorization"))
    if bearer:
        found.append(bearer)
    selected = None
    if SUBPROTOCOL in subprotocols:
        selected = SUBPROTOCOL
        for proto in subprotocols:
            if proto.startswith(TOKEN_SUBPROTOCOL_PREFIX):
                found.append(proto[len(TOKEN_SUBPROTOCOL_PREFIX):])
    cookie = _cookie_token(headers.get("cookie"))
    if cookie:
        found.append(cookie)
    return found, selected


def _split_host(host_header: str) -> tuple[str, str | None]:
    """``host[:port]`` -> (hostname, port); handles ``[::1]:8765``."""
    value = host_header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return value, None
        name, rest = value[1:end], value[end + 1:]
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, None


def origin_allowed(origin: str, host_header: str | None, config: Config) -> bool:
    """Same-origin with the request's Host, listed in ``--allow-origin``, or (loopback binds with auth on)
    an opaque ``null`` / ``file://`` origin from a local page.  With ``--no-auth`` an opaque origin must be
    listed: any web site can embed a sandboxed iframe whose origin is ``null``, and without a token the
    origin check is all that stands between that page and a shell."""
    normalized = origin.strip().rstrip("/").lower()
    if normalized in config.allowed_origins:
        return True
    if normalized == "null" or normalized.startswith("file:"):
        return config.loopback and config.auth_required
    parts = urlsplit(normalized)
    if parts.scheme not in ("http", "https") or not parts.hostname or host_header is None:
        return False
    origin_host = parts.hostname
    try:
        origin_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    req_host, req_port = _split_host(host_header)
    try:
        request_port = int(req_port) if req_port else (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return origin_host == req_host and origin_port == request_port


def check_handshake(
    config: Config,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    subprotocols: Sequence[str] = (),
    require_token: bool = True,
) -> Verdict:
    """Apply every check of PROTOCOL section 3; header names must be lower-case."""
    host = headers.get("host")
    if config.loopback:
        if host is None or not is_loopback_host(_split_host(host)[0]):
            return Verdict("host")
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, host, config):
        return Verdict("origin")
    tokens, selected = presented_tokens(headers, query, subprotocols)
    if require_token and config.auth_required:
        assert config.token, "Config.with_token() must run before serving"
        # Compare every presented token so the time taken does not depend on which form matched.
        matched = False
        for token in tokens:
            matched = tokens_match(token, config.token) | matched
        if not matched:
            return Verdict("token")
    return Verdict(None, selected)
