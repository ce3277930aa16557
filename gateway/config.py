"""The one place where settings are read: CLI flags, ``WORKER_GATEWAY_*`` environment variables, defaults.

Every knob is declared once, as a field of ``Config`` (``knob(...)``), and ``KNOBS`` is derived from it; the argument parser, ``--help`` text, environment lookup and the
malformed-value fallback are all derived from that table, so a setting cannot be documented in one place
and parsed differently in another.  ``Config`` is frozen: the running server never mutates its settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.rootpath import normalize_root_path

logger = logging.getLogger("worker_gateway.config")

ENV_PREFIX = "WORKER_GATEWAY_"
PUBLIC_PING_INTERVAL_S = 20.0
PUBLIC_PING_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Knob:
    """One setting: its field name, type, default, help, and the bounds a parsed value must respect."""

    name: str
    kind: type  # int, float, str, bool, or "optional float" via optional=True
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False  # accepts "none"/"off" meaning None
    flag: str | None = None  # defaults to --name-with-dashes
    choices: tuple[str, ...] | None = None  # for str knobs: the accepted values

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


_MIB = 1024 * 1024


def knob(
    kind: type,
    default: Any,
    help: str,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    optional: bool = False,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A :class:`Config` field that is a setting: its flag, environment variable, ``--help`` line and bounds
    are derived from this one declaration (see :data:`KNOBS`)."""
    spec = {
        "kind": kind,
        "help": help,
        "minimum": minimum,
        "maximum": maximum,
        "optional": optional,
        "flag": flag,
        "choices": choices,
    }
    return dataclasses.field(default=default, metadata={"knob": spec})


_ROOT_PATH_CHARS = re.compile(r"(/[A-Za-z0-9._~-]+)*")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_NONE = {"none", "off", "null", "disabled"}


# --- session store ---
def default_state_dir(environ: Mapping[str, str] | None = None) -> str:
    """``$XDG_STATE_HOME/worker-gateway``, else ``~/.local/state/worker-gateway`` (the XDG base-dir rule:
    a relative XDG_STATE_HOME is ignored)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "worker-gateway")


def store_state_dir(config: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """Where this run keeps its store: None with ``--no-state``, else ``--state-dir`` or the default."""
    if config.no_state:
        return None
    return os.path.expanduser(config.state_dir) if config.state_dir else default_state_dir(environ)


class ConfigError(ValueError):
    """A setting that cannot be used even with a fallback (e.g. --no-auth on a public bind)."""


def parse_value(knob: Knob, raw: str) -> Any:
    """Parse one raw string for ``knob``; raise ValueError with a user-facing reason when it is malformed."""
    text = raw.strip()
    if knob.optional and text.lower() in _NONE:
        return None
    if knob.kind is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected a boolean (1/0, true/false), got {raw!r}")
    if knob.kind is str:
        if knob.choices is not None and text.lower() not in knob.choices:
            raise ValueError(f"expected one of {', '.join(knob.choices)}, got {raw!r}")
        return text.lower() if knob.choices is not None else text
    try:
        value = knob.kind(text)
    except ValueError:
        raise ValueError(f"expected {'an integer' if knob.kind is int else 'a number'}, got {raw!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    if knob.minimum is not None and value < knob.minimum:
        raise ValueError(f"must be >= {knob.minimum}, got {raw!r}")
    if knob.maximum is not None and value > knob.maximum:
        raise ValueError(f"must be <= {knob.maximum}, got {raw!r}")
    return value


def env_value(knob: Knob, environ: Mapping[str, str]) -> tuple[bool, Any]:
    """Return ``(present, value)`` for ``knob`` from the environment, falling back to the default (with a
    warning naming the variable) when the value is malformed: a bad environment never stops the server."""
    raw = environ.get(knob.env)
    if raw is None:
        return False, knob.default
    try:
        return True, parse_value(knob, raw)
    except ValueError as exc:
        logger.warning("ignoring %s: %s; using the default %r", knob.env, exc, knob.default)
        return False, knob.default


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``::1`` and any address in 127.0.0.0/8 (brackets around IPv6 accepted)."""
    name = host.strip().lower().strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def ping_policy(
    host: str,
    interval: float | None = None,
    timeout: float | None = None,
    explicit: bool = False,
) -> tuple[float | None, float | None]:
    """The keepalive for a bind: off on loopback (a dead local peer is seen by its FIN/RST), 20 s / 20 s
    elsewhere (half-open connections behind tunnels are real).  ``explicit`` values win on any bind."""
    if explicit:
        return interval, timeout
    if is_loopback_host(host):
        return None, None
    return PUBLIC_PING_INTERVAL_S, PUBLIC_PING_TIMEOUT_S


@dataclass(frozen=True)
class Config:
    """Every setting of a gateway run.  Build it with :meth:`load` (CLI + environment) or directly in tests."""

    # Start-up and network
    host: str = knob(
        str,
        "127.0.0.1",
        "address to bind (loopback disables the WebSocket ping by default)",
    )
    port: int = knob(
        int,
        8765,
        "TCP port; 0 asks the OS for a free one (announced on the ready line)",
        0,
        65535,
    )
    agent: str = knob(
        str,
        "echo",
        "default agent for new sessions: built-in name, entry point or package.module:attr",
    )
    token: str | None = knob(str, None, "auth token (generated at start when unset)", optional=True)
    no_auth: bool = knob(
        bool,
        False,
        "accept clients without a token (refused unless the bind is loopback)",
    )
    ready_file: str | None = knob(
        str,
        None,
        'write {"port", "pid"} to this path atomically once serving',
        optional=True,
    )
    ws_ping_interval: float | None = knob(
        float,
        None,
        "WebSocket ping interval in seconds, 'none' to disable (default: off on loopback, 20 elsewhere)",
        0.0,
        None,
        optional=True,
    )
    ws_ping_timeout: float | None = knob(
        float,
        None,
        "WebSocket ping timeout in seconds, 'none' to disable (default: off on loopback, 20 elsewhere)",
        0.0,
        None,
        optional=True,
    )
    allow_origin: str = knob(str, "", "comma-separated extra origins allowed to open WebSockets")
    metrics_public: bool = knob(bool, False, "serve /metrics without auth")
    max_message_bytes: int = knob(
        int,
        _MIB,
        "largest client WebSocket message; larger closes with 1009",
        1024,
        None,
    )
    log_level: str = knob(
        str,
        "info",
        "log level",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
    )
    # Workers
    pool_size: int = knob(int, 2, "warm agent workers kept ready (0 = cold start per session)", 0, 64)
    kill_grace_s: float = knob(
        float,
        2.0,
        "seconds between SIGTERM and SIGKILL when stopping a worker group",
        0.05,
        60,
    )
    worker_nice: int = knob(
        int,
        19,
        "nice of worker processes, and of their sessions' scheduling groups (Linux autogroups) when idle "
        "or many run a turn: keeps the relay first on a CPU that many sessions keep busy",
        0,
        19,
    )
    worker_cpu_share: float = knob(
        float,
        0.25,
        "CPU weight of the local workers running a turn, together, against the gateway's (1 = the same): "
        "the weight of their cgroup, or else the nice of their sessions' autogroups follows their number, "
        "one alone at 7, 16 and more at 19 (0 = autogroups all at worker_nice, a cgroup's least weight)",
        0,
        64,
    )
    worker_cpu_cgroup: str = knob(
        str,
        "auto",
        "auto: run the local workers in one CPU cgroup of worker_cpu_share where the gateway can make one "
        "(root or a delegated cpu controller), else weigh their sessions' autogroups; off: autogroups",
        choices=("auto", "off"),
    )
    worker_start_timeout_s: float = knob(float, 30.0, "seconds a worker may take to load its agent", 1, 600)
    watchdog_poll_s: float = knob(float, 0.5, "parent-death poll period of workers (floor 0.05 s)", 0.05, 2.0)
    # Sessions
    grace_s: float = knob(
        float,
        60.0,
        "seconds a detached session is kept for resume (0 = until the idle TTL)",
        0,
        None,
    )
    idle_ttl_s: float = knob(
        float,
        6 * 3600.0,
        "seconds of inactivity after which a detached session is closed",
        1,
        None,
    )
    interrupt_grace_s: float = knob(
        float,
        3.0,
        "seconds a turn has to stop after session.interrupt before its worker is killed",
        0.05,
        120,
    )
    replay_max_events: int = knob(int, 4096, "events kept per session for replay", 16, None)
    replay_max_bytes: int = knob(int, 8 * _MIB, "bytes kept per session for replay", 65536, None)
    outbound_max_bytes: int = knob(
        int,
        4 * _MIB,
        "bytes queued per connection before its sessions' pipes pause",
        65536,
        None,
    )
    max_queued_prompts: int = knob(int, 8, "prompts queued per session (beyond: error 4009)", 0, 1024)
    # Limits
    max_sessions: int = knob(int, 64, "live sessions in total (beyond: error 4029)", 1, 100000)
    max_sessions_per_connection: int = knob(
        int, 32, "live sessions owned by one connection (beyond: error 4029)", 1, 100000
    )
    max_terminals: int = knob(int, 16, "open terminals (beyond: error 4029)", 0, 10000)
    max_connections: int = knob(
        int,
        256,
        "concurrent WebSocket connections (beyond: closed with 1013)",
        1,
        1000000,
    )
    rate_per_s: float = knob(
        float,
        200.0,
        "requests per second per connection (token bucket rate)",
        0.1,
        None,
    )
    rate_burst: int = knob(int, 400, "requests per connection allowed in a burst", 1, None)
    max_json_depth: int = knob(int, 32, "deepest nesting accepted in a request (deeper: -32600)", 2, 1000)
    # Slash commands and terminals
    slash_timeout_s: float = knob(
        float,
        45.0,
        "seconds a slash command may run before its worker is killed",
        0.1,
        3600,
    )
    terminal_grace_s: float = knob(float, 300.0, "seconds a terminal outlives its dropped socket", 0, None)
    # --- session core ---
    blocked_detached_s: float | None = knob(
        float,
        300.0,
        "seconds a detached session may stay blocked (nobody reads its events, its worker waits) before it is "
        "closed with reason 'blocked' ('none' = never)",
        1,
        None,
        optional=True,
    )
    max_title_chars: int = knob(int, 4096, "longest session title accepted (longer: -32602)", 16, None)
    events_page_max_bytes: int = knob(
        int,
        8 * _MIB,
        "most bytes of events one session.events.since answer holds",
        65536,
        None,
    )
    events_page_max_events: int = knob(int, 100000, "most events one session.events.since answer holds", 16, None)
    # --- session store ---
    state_dir: str | None = knob(
        str,
        None,
        "directory of the session store (default $XDG_STATE_HOME/worker-gateway, else ~/.local/state/worker-gateway)",
        optional=True,
    )
    no_state: bool = knob(bool, False, "keep sessions in memory only (no store; a restart loses them)")
    retention_days: float = knob(float, 30.0, "days a closed session stays stored", 0, None)
    store_max_bytes: int = knob(
        int,
        1024 * _MIB,
        "event bytes the store keeps; past it the oldest closed sessions go first",
        _MIB,
        None,
    )
    detached_quota_bytes: int = knob(
        int,
        64 * _MIB,
        "bytes a running turn may add to the log while its session is detached; past it the turn blocks",
        65536,
        None,
    )
    # --- edge: proxies, handshakes, slowloris (docs/deployment.md, docs/security.md) ---
    forwarded_allow_ips: str = knob(
        str,
        "127.0.0.1,::1",
        "comma-separated proxy addresses or networks whose X-Forwarded-For / X-Forwarded-Proto set the client "
        "address in logs and the scheme ('*' trusts every peer, 'none' no one)",
    )
    root_path: str = knob(
        str,
        "",
        "URL path prefix the gateway is served under behind a reverse proxy, e.g. /gw (the proxy may strip it or not)",
    )
    handshake_timeout_s: float = knob(
        float,
        10.0,
        "seconds a new connection may take to send its request head (slow or silent ones are closed)",
        0.1,
        600,
    )
    max_pending_connections: int = knob(
        int,
        64,
        "connections whose request head is not complete yet (beyond: the newest are closed at once)",
        1,
        100000,
    )
    # --- processes and terminals ---
    terminal_input_stall_s: float = knob(
        float,
        30.0,
        "seconds a terminal's program may leave its input unread while more is pending before the socket is "
        "dropped (then the grace applies)",
        0.1,
        3600,
    )
    terminal_attach_rate_per_s: float = knob(
        float, 20.0, "/pty attaches per second, gateway-wide (token bucket)", 0.1, None
    )
    terminal_attach_burst: int = knob(int, 40, "/pty attaches allowed in a burst", 1, None)
    # --- ray backend (docs/scaling.md) ---
    backend: str = knob(
        str,
        "local",
        "where agent workers run: local (forkserver pool on this machine) or ray "
        "(host actors on a Ray cluster; needs the ray extra)",
        choices=("local", "ray"),
    )
    ray_address: str | None = knob(
        str,
        None,
        "Ray GCS address host:port to join as a driver, or 'local' for a "
        "private cluster owned by the gateway (never 'auto', never ray://)",
        optional=True,
    )
    ray_sessions_per_node: int = knob(int, 32, "sessions one Ray node takes at most (admission control)", 1, 100000)
    ray_placement_timeout_s: float = knob(
        float, 10.0, "seconds session.create waits for a Ray node with room before failing with 5001", 0.1, 600
    )
    # --- relay read path (docs/operations.md "Relay read path") ---
    worker_pipe_bytes: int = knob(
        int,
        256 * 1024,
        "size of the pipe each worker's frames arrive on (Linux F_SETPIPE_SZ; clamped to the per-user pipe "
        "quota shared by max_sessions pipes; 0 = the kernel default, 64 KiB)",
        0,
        64 * _MIB,
    )
    relay_read_budget_bytes: int = knob(
        int,
        256 * 1024,
        "bytes the gateway reads from all worker pipes together in one event-loop iteration (keeps each "
        "turn of the loop short whatever the session count; the rest is read in the next iterations)",
        64 * 1024,
        256 * _MIB,
    )
    worker_sched: str = knob(
        str,
        "batch",
        "CPU scheduling policy of agent workers: normal, batch (SCHED_BATCH: the relay is not preempted "
        "by them) or idle (SCHED_IDLE: they run only on spare CPU)",
        choices=("normal", "batch", "idle"),
    )
    # Derived at load time, not a setting: whether the ping flags were given explicitly.
    ping_explicit: bool = False

    def __post_init__(self) -> None:
        if self.ping_explicit:
            return
        interval, timeout = ping_policy(self.host)
        object.__setattr__(self, "ws_ping_interval", interval)
        object.__setattr__(self, "ws_ping_timeout", timeout)

    # Derived settings --------------------------------------------------------------------------------
    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def allowed_origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/").lower() for o in self.allow_origin.split(",") if o.strip())

    @property
    def auth_required(self) -> bool:
        return not self.no_auth

    def with_token(self) -> Config:
        """This config with a token: the given one, or a fresh random one when auth is on and none was set."""
        if self.token or self.no_auth:
            return self
        # The prefix keeps a generated token from starting with "-", which a command line would take for
        # a flag (``--token -x...``), and makes it recognisable to secret scanners.
        return dataclasses.replace(self, token="wg_" + secrets.token_urlsafe(24))

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def normalized_root_path(self) -> str:
        """``--root-path`` as ``/prefix`` without a trailing slash, or ``""``."""
        return normalize_root_path(self.root_path)

    @property
    def trusted_proxies(self) -> list[str]:
        """``--forwarded-allow-ips`` as uvicorn's ``forwarded_allow_ips`` list (empty: trust no one)."""
        if self.forwarded_allow_ips.strip().lower() in _NONE:
            return []
        return [item.strip() for item in self.forwarded_allow_ips.split(",") if item.strip()]

    def validate(self) -> None:
        """Refuse combinations no fallback can make safe."""
        if not _ROOT_PATH_CHARS.fullmatch(self.normalized_root_path):
            raise ConfigError(
                f"--root-path {self.root_path!r} may hold only letters, digits and - . _ ~ / (e.g. --root-path /gw)"
            )
        for item in self.trusted_proxies:
            if item == "*":
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(
                    f"--forwarded-allow-ips: {item!r} is not an IP address or network "
                    "(e.g. 127.0.0.1,::1 or 10.0.0.0/8, '*' for all, 'none')"
                ) from None
        if self.no_auth and not self.loopback:
            raise ConfigError(
                f"--no-auth is refused on the non-loopback bind {self.host!r}: anyone who can reach it could "
                "run commands. Bind to 127.0.0.1 or pass a --token."
            )

    # Construction ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
        """Parse ``serve`` flags over environment variables over defaults."""
        environ = os.environ if environ is None else environ
        parser = build_parser()
        ns = parser.parse_args(list(argv) if argv is not None else [])
        return cls.from_namespace(ns, environ)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, environ: Mapping[str, str]) -> Config:
        values: dict[str, Any] = {}
        ping_explicit = False
        for knob in KNOBS:
            given = getattr(ns, knob.name, _UNSET)
            if given is not _UNSET:
                values[knob.name] = given
                explicit = True
            else:
                explicit, values[knob.name] = env_value(knob, environ)
            if knob.name in ("ws_ping_interval", "ws_ping_timeout") and explicit:
                ping_explicit = True
        return cls(**values, ping_explicit=ping_explicit)


#: Every setting, in declaration order: the fields of :class:`Config` declared with :func:`knob`.
KNOBS: tuple[Knob, ...] = tuple(
    Knob(f.name, default=f.default, **f.metadata["knob"]) for f in dataclasses.fields(Config) if "knob" in f.metadata
)
_KNOBS_BY_NAME = {k.name: k for k in KNOBS}


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def _argparse_type(knob: Knob) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        try:
            return parse_value(knob, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = knob.kind.__name__
    return convert


def add_knob_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per knob; unset flags stay ``_UNSET`` so the environment can fill them."""
    for knob in KNOBS:
        default_text = "generated" if knob.name == "token" else ("none" if knob.default is None else knob.default)
        choices = f" ({', '.join(knob.choices)})" if knob.choices else ""
        help_text = f"{knob.help}{choices} [env {knob.env}; default {default_text}]"
        if knob.kind is bool:
            parser.add_argument(
                knob.option,
                dest=knob.name,
                action="store_const",
                const=True,
                default=_UNSET,
                help=help_text,
            )
        else:
            parser.add_argument(
                knob.option,
                dest=knob.name,
                type=_argparse_type(knob),
                default=_UNSET,
                metavar=knob.name.upper(),
                help=help_text,
            )


def build_parser(prog: str = "worker-gateway serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the worker-gateway: WebSocket JSON-RPC on /ws, terminals on /pty/{id}, the dashboard "
        "on /. Every flag can also be set by the environment variable shown with it; flags win.",
    )
    add_knob_arguments(parser)
    return parser
