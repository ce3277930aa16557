"""Handshake checks (PROTOCOL section 3): token, Origin, and Host on loopback binds; the dashboard cookie.

Pure functions of the request's headers, query, scheme and the config, so every rejection case is
unit-testable; the app calls :func:`check_handshake` before ``accept`` and answers a rejection with HTTP
403 whose body is the verdict's ``detail`` (what failed, and what to change).

The dashboard cookie never holds the token.  Browsers do not scope cookies by port, so a cookie set by
``127.0.0.1:8765`` is sent to every other server on ``127.0.0.1``; it therefore holds an opaque value
derived from the token (:func:`cookie_value`) under a per-port name (:func:`cookie_name`), accepted only as
that cookie: whoever receives it cannot use it as a token (``?token=``, Bearer, subprotocol), and it stops
working when the token changes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from gateway.config import Config, is_loopback_host
from gateway.wire import COOKIE_NAME, SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX

#: Longest piece of a client's header value repeated in a 403 body or a log line.
_ECHO_MAX = 120


@dataclass(frozen=True)
class Verdict:
    """Outcome of a handshake check: ``reason`` (a short metric label: ``host``, ``origin``, ``token``...)
    is None when accepted; ``detail`` says what failed in words a user can act on."""

    reason: str | None
    subprotocol: str | None = None
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.reason is None


def tokens_match(given: str | None, expected: str) -> bool:
    """Constant-time comparison (no early exit that would leak the token's prefix through timing)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def cookie_name(port: int | None, secure: bool = False, root_path: str = "") -> str:
    """The dashboard cookie's name for the gateway on ``port``: ``wg_token_<port>`` (two gateways on one
    host keep separate cookies); on https with no path prefix ``__Host-`` (the browser then refuses it
    from plain http and from other hosts), with a prefix ``__Secure-`` (``__Host-`` requires ``Path=/``)."""
    base = f"{COOKIE_NAME}_{port}" if port else COOKIE_NAME
    if not secure:
        return base
    return ("__Secure-" if root_path else "__Host-") + base


def cookie_value(token: str) -> str:
    """The opaque value the dashboard cookie carries: a keyed hash of the token, never the token itself."""
    digest = hmac.new(token.encode("utf-8"), b"worker-gateway dashboard cookie v1", hashlib.sha256).digest()
    return "wgc_" + base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _cookies(cookie_header: str | None) -> dict[str, str]:
    if not cookie_header:
        return {}
    jar = SimpleCookie()
    try:
        jar.load(cookie_header)
    except Exception:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def _cookie_token(cookie_header: str | None) -> str | None:
    """The legacy ``wg_token`` cookie holding the token itself (PROTOCOL section 3; the server no longer
    sets it, but a client that does is still accepted)."""
    return _cookies(cookie_header).get(COOKIE_NAME)


def _dashboard_cookies(cookie_header: str | None, port: int | None) -> list[str]:
    jar = _cookies(cookie_header)
    base = cookie_name(port)
    names = (base, "__Host-" + base, "__Secure-" + base)
    return [jar[name] for name in names if name in jar]


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
                found.append(proto[len(TOKEN_SUBPROTOCOL_PREFIX) :])
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
        name, rest = value[1:end], value[end + 1 :]
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, None


_DEFAULT_PORTS = {"http": 80, "https": 443}
_HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def origin_allowed(origin: str, host_header: str | None, config: Config, scheme: str | None = None) -> bool:
    """Same-origin with the request (scheme, Host name and port), listed in ``--allow-origin``, or (loopback
    binds with auth on) an opaque ``null`` / ``file://`` origin from a local page.  With ``--no-auth`` an
    opaque origin must be listed: any web site can embed a sandboxed iframe whose origin is ``null``, and
    without a token the origin check is all that stands between that page and a shell.  ``scheme`` is the
    request's (``ws``/``wss``/``http``/``https``, after trusted ``X-Forwarded-Proto``); None skips that part."""
    normalized = origin.strip().rstrip("/").lower()
    if normalized in config.allowed_origins:
        return True
    if normalized == "null" or normalized.startswith("file:"):
        return config.loopback and config.auth_required
    parts = urlsplit(normalized)
    if parts.scheme not in ("http", "https") or not parts.hostname or host_header is None:
        return False
    request_scheme = _HTTP_SCHEME.get(scheme or "", parts.scheme)
    if parts.scheme != request_scheme:
        return False
    origin_host = parts.hostname
    try:
        origin_port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return False
    req_host, req_port = _split_host(host_header)
    try:
        request_port = int(req_port) if req_port else _DEFAULT_PORTS[request_scheme]
    except ValueError:
        return False
    return origin_host == req_host and origin_port == request_port


def _echo(value: str) -> str:
    """A client's header value, safe to repeat in a log line or a 403 body (printable, bounded)."""
    text = value if len(value) <= _ECHO_MAX else value[:_ECHO_MAX] + "..."
    return repr(text)


def check_handshake(
    config: Config,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    subprotocols: Sequence[str] = (),
    require_token: bool = True,
    scheme: str | None = None,
    server_port: int | None = None,
) -> Verdict:
    """Apply every check of PROTOCOL section 3; header names must be lower-case.  ``server_port`` (the
    gateway's own port) names the dashboard cookie to accept; ``scheme`` is compared with the Origin's."""
    host = headers.get("host")
    if config.loopback:
        if host is None:
            return Verdict(
                "host",
                detail="the request has no Host header; this gateway is bound to loopback "
                "and only answers requests whose Host names a loopback host",
            )
        if not is_loopback_host(_split_host(host)[0]):
            return Verdict(
                "host",
                detail=(
                    f"Host {_echo(host)} is not a loopback host, and this gateway is bound to loopback "
                    f"({config.host}): the check defends against DNS rebinding. Behind a proxy or tunnel, make "
                    "it send Host: 127.0.0.1:<port> (nginx: proxy_set_header Host 127.0.0.1:<port>; cloudflared: "
                    "httpHostHeader) and list the public origin in --allow-origin"
                ),
            )
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, host, config, scheme):
        return Verdict(
            "origin",
            detail=(
                f"Origin {_echo(origin)} is not same-origin with this request (scheme {_HTTP_SCHEME.get(scheme or '', '?')}, "
                f"Host {_echo(host or '')}) and is not listed in --allow-origin"
            ),
        )
    tokens, selected = presented_tokens(headers, query, subprotocols)
    if require_token and config.auth_required:
        assert config.token, "Config.with_token() must run before serving"
        # Compare every presented credential so the time taken does not depend on which form matched.
        matched = False
        for token in tokens:
            matched = tokens_match(token, config.token) | matched
        expected_cookie = cookie_value(config.token)
        for value in _dashboard_cookies(headers.get("cookie"), server_port):
            matched = tokens_match(value, expected_cookie) | matched
        if not matched:
            return Verdict(
                "token",
                detail=(
                    "missing or wrong token: give it as ?token=, an Authorization: Bearer header or the "
                    "worker-gateway.v1 + worker-gateway.token.<T> subprotocol pair, or open the dashboard URL "
                    "the gateway printed at start-up"
                ),
            )
    return Verdict(None, selected)
