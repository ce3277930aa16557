"""Start-up and shutdown of one gateway process.

Phases (as in ``uvicorn.Server``): bind the socket ourselves (so ``--port 0`` knows its port before
serving, and a taken port is a clear one-line error), start uvicorn on it, announce readiness once the
server accepts connections (stdout line + optional ready file), and on SIGINT/SIGTERM close every session
through the teardown funnel before the sockets go, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import uvicorn

from gateway import heap, procfs, wire
from gateway.app import GatewayState, create_app
from gateway.config import Config, ConfigError
from gateway.httpproto import protocol_class as http_protocol_class
from gateway.loops import select_loop_factory
from gateway.rootpath import RootPathMiddleware
from gateway.store.errors import StoreError
from gateway.wsproto import protocol_class
from workers.backends.ray_errors import BackendUnavailable

logger = logging.getLogger("worker_gateway.server")
READY_PREFIX = wire.READY_LINE_PREFIX
EXIT_USAGE = 2
TRACE_LEVEL = 5  # uvicorn's "trace" level


class StartupError(Exception):
    """A start-up failure the user can fix: printed as one line, exit status 2."""


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """Bind and listen on (host, port); raise StartupError naming the port when it is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve bind host {host!r}: {exc.strerror}") from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise StartupError(
                f"port {port} on {host} is already in use; pick another with --port (or --port 0 for any free port)"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise StartupError(f"not allowed to bind {host}:{port} ({exc.strerror}); use a port above 1023") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot bind {host}:{port}: the address is not on this machine") from None
        raise StartupError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def write_ready_file(path: str, port: int) -> None:
    """Atomically (temp file + fsync + rename) write ``{"port", "pid"}`` for launchers that can't read stdout."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ready-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"port": port, "pid": os.getpid()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class RedactTokens(logging.Filter):
    """The token must appear in no log line but the one start-up URL.  uvicorn logs WebSocket paths with
    their query (``/ws?token=...``) and, at debug level, the handshake headers (``Authorization: Bearer``,
    the token subprotocol): mask every form, wrong tokens included, plus the configured token itself."""

    _FORMS = re.compile(r"(token=|bearer\s+|worker-gateway\.token\.)[^&\s\"',]+", re.IGNORECASE)

    def __init__(self, token: str | None) -> None:
        super().__init__()
        self._token = token

    def _mask(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "[REDACTED]")
        return self._FORMS.sub(r"\1[REDACTED]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self._mask(record.msg)
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(
                self._mask(a) if isinstance(a, str) else self._mask(a.decode("latin-1")) if isinstance(a, bytes) else a
                for a in args
            )
        return True


def install_log_redaction(token: str | None) -> None:
    redact = RedactTokens(token)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "worker_gateway"):
        logging.getLogger(name).addFilter(redact)


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:g}s"


def describe_ping(cfg: Config) -> str:
    """The keepalive policy in the start-up line, e.g. ``off for direct loopback peers, 20s/20s otherwise``."""
    configured = f"{_seconds(cfg.ws_ping_interval)}/{_seconds(cfg.ws_ping_timeout)}"
    if cfg.ping_explicit:
        return "off" if cfg.ws_ping_interval is None else configured
    if cfg.loopback:
        return (
            f"off for direct loopback peers, {_seconds(wire.PUBLIC_PING_INTERVAL_S)}/"
            f"{_seconds(wire.PUBLIC_PING_TIMEOUT_S)} for proxied or remote ones"
        )
    return configured


class GatewayServer(uvicorn.Server):
    """uvicorn's server with our readiness announcement and a session-aware graceful shutdown."""

    def __init__(self, config: uvicorn.Config, gateway_config: Config, state: GatewayState) -> None:
        super().__init__(config)
        self.gateway_config = gateway_config
        self.state = state
        self.port: int | None = None
        self.startup_error: str | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started or self.should_exit:
            return
        assert sockets
        self.port = sockets[0].getsockname()[1]
        heap.freeze_startup_heap()
        self.announce(self.port)

    def announce(self, port: int) -> None:
        """The people's line on stderr first, then the ready file and the machine line on stdout: whoever
        waits for readiness finds the stderr line already written (a test read it too early once)."""
        cfg = self.gateway_config
        base = f"http://{display_host(cfg.host)}:{port}{cfg.normalized_root_path}/"
        dashboard = f"{base}?token={cfg.token}" if cfg.token else base
        ping = describe_ping(cfg)
        print(
            f"worker-gateway: serving on {base} (agent {cfg.agent}, ping {ping}); dashboard: {dashboard}",
            file=sys.stderr,
            flush=True,
        )
        if cfg.ready_file:
            write_ready_file(cfg.ready_file, port)
        sys.stdout.write(f"{READY_PREFIX} port={port} url={base}\n")
        sys.stdout.flush()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Sessions first, while their owners are still connected to hear session.closed(shutdown).
        for server in self.servers:
            server.close()
        await self.state.shutdown()
        await super().shutdown(sockets=sockets)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await self.state.open_store()
        except StoreError as exc:
            self.startup_error = exc.message
            return
        try:
            await self.state.open_backend()
        except BackendUnavailable as exc:
            self.startup_error = exc.message
            await self.state.close_store()
            return
        try:
            with self.capture_signals():
                await self._serve(sockets)
                # A signal was a request for a graceful stop, which is done: exit 0 rather than re-raising it.
                self._captured_signals.clear()
        finally:
            if self.state.backend is not None and not self.state.shutting_down:
                await self.state.backend.close()  # the lifespan never ran its shutdown
            await self.state.close_store()


def uvicorn_config(app: Any, config: Config) -> uvicorn.Config:
    if config.normalized_root_path:
        app = RootPathMiddleware(app, config.normalized_root_path)
    trusted = config.trusted_proxies
    return uvicorn.Config(
        app,
        lifespan="on",
        # Real client addresses in logs from X-Forwarded-For, only when the peer is a trusted proxy.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        # The per-connection keepalive (gateway/keepalive.py) is decided by this protocol class; the two
        # values below are only uvicorn's defaults, which the class overrides for every connection.
        ws=protocol_class(config),
        http=http_protocol_class(config),  # request-head deadline and pending-connection cap (slowloris)
        ws_ping_interval=config.ws_ping_interval,
        ws_ping_timeout=config.ws_ping_timeout,
        ws_max_size=config.max_message_bytes,
        ws_per_message_deflate=False,
        log_level=config.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        server_header=False,
    )


def serve(argv: Sequence[str] | None = None) -> int:
    """``worker-gateway serve``: returns the process exit status."""
    try:
        config = Config.load(argv).with_token()
        config.validate()
        sock = bind_socket(config.host, config.port)
    except (ConfigError, StartupError) as exc:
        print(f"worker-gateway: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    # Workers inherit the environment: the token must not reach agent code (a `shell` prompt could print it).
    os.environ.pop("WORKER_GATEWAY_TOKEN", None)
    # Nor /proc/<pid>/environ and /proc/<pid>/cmdline, which the pop above does not change.
    procfs.erase_secret(config.token or "", "WORKER_GATEWAY_TOKEN")
    logging.addLevelName(TRACE_LEVEL, "TRACE")
    level = TRACE_LEVEL if config.log_level == "trace" else logging.getLevelName(config.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app = create_app(config)
    uv_config = uvicorn_config(app, config)  # configures uvicorn's loggers: add the filter after it
    install_log_redaction(config.token)
    server = GatewayServer(uv_config, config, app.state.gateway)
    try:
        with asyncio.Runner(loop_factory=select_loop_factory(uv_config)) as runner:
            runner.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if server.startup_error is not None:
        print(f"worker-gateway: error: {server.startup_error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return 0 if server.started or server.should_exit else 1
