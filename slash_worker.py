"""The slash-command worker: one persistent process per session, leader of its own process group.

Run as ``python slash_worker.py --parent-pid PID [--poll S] [--nice N]`` (or ``python -m slash_worker``),
started with ``start_new_session=True`` by ``gateway/slash.py``.  It speaks ``workers/channel.py`` frames on
its stdin/stdout, one request at a time::

    CONTROL exec   {"id", "command", "cwd", "snapshot"}   gateway -> worker
    CONTROL result {"id", "ok", "output"}                 worker -> gateway

Nothing else is ever written to the frame stream: fd 1 is re-pointed at stderr at start-up, so a stray
``print`` in a plugin command cannot corrupt it.

Commands are a registry: the built-ins below plus every entry point of the group ``worker_gateway.slash``
(the entry point's name is the command's name; its object is a :class:`Command`, or a callable
``(ctx: SlashContext, args: list[str]) -> str`` whose docstring's first line is its help).  A command
raises :class:`SlashError` for a failure the user should read (``ok: false``).

Commands run in this process and may hold the GIL for a long time (``/grep`` with a catastrophic regex
never releases it), so parent death is watched not by a thread but by the session's keeper
(``workers/keeper.py``), the process this one splits off at start-up: it watches the request pipe for
hang-up and the ``--parent-pid`` it was given (never ``getppid()``, so being re-parented while the gateway
lives is not mistaken for its death), and ends the whole session, including whatever a command started
with ``setsid``, when the gateway is gone.  At EOF on its requests the worker has the keeper end it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import logging
import os
import re
import shlex
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import keeper, priority
from workers.channel import ChannelError, FrameDecoder, Kind, control_frame
from workers.scrub import scrub

logger = logging.getLogger("worker_gateway.slash_worker")

ENTRY_POINT_GROUP = "worker_gateway.slash"
#: Largest text a command returns (characters); longer output is cut with a note saying so.
OUTPUT_CAP = 256 * 1024
#: Extra bytes read past the cap so that a secret straddling the cut is still whole when scrubbed.
_SCRUB_MARGIN = 4096
_BINARY_SNIFF = 8192
GREP_MAX_MATCHES = 1000
GREP_MAX_LINE = 400
GREP_MAX_FILE_BYTES = 16 * 1024 * 1024
#: Directories a /grep walk does not enter (hidden ones are skipped too); naming one as PATH still searches it.
GREP_SKIP_DIRS = frozenset({"node_modules", "__pycache__"})
LS_MAX_ENTRIES = 2000
WATCHDOG_FLOOR_S = 0.05


class SlashError(Exception):
    """A failure the user can act on: the reply is ``{"ok": false, "output": str(error)}``."""


@dataclass(frozen=True)
class SlashContext:
    """What a command may use: the session's directory (resolved), the gateway's session snapshot, and the
    registry (for ``/help``)."""

    cwd: Path
    snapshot: Mapping[str, Any]
    registry: CommandRegistry

    def confine(self, raw: str) -> Path:
        """Resolve ``raw`` (relative to the session directory, symlinks followed) and refuse anything that
        lands outside it."""
        target = (self.cwd / raw).resolve()
        if target != self.cwd and self.cwd not in target.parents:
            raise SlashError(f"refused: {raw} is outside the session directory ({self.cwd})")
        return target

    def shown(self, path: Path) -> str:
        """``path`` as the user should see it: relative to the session directory."""
        rel = path.relative_to(self.cwd).as_posix()
        return rel if rel != "." else "."


@dataclass(frozen=True)
class Command:
    name: str  # without the slash
    usage: str  # e.g. "/grep PATTERN [PATH]"
    help: str  # one line
    run: Callable[[SlashContext, list[str]], str]


class CommandRegistry:
    """Built-ins first; entry points cannot shadow them.  A plugin that fails to load is listed by
    ``/help`` with the reason, and running it says why, instead of breaking the other commands."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._broken: dict[str, str] = {}

    def add(self, command: Command) -> None:
        if command.name in self._commands:
            raise ValueError(f"slash command /{command.name} is already registered")
        self._commands[command.name] = command

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in importlib.metadata.entry_points(group=group):
            name = ep.name.lstrip("/")
            if name in self._commands:
                logger.warning("entry point %s tries to replace the command /%s; ignored", ep.value, name)
                continue
            try:
                self._commands[name] = _as_command(name, ep.load())
            except Exception as exc:  # a broken plugin must not take the other commands down
                self._broken[name] = f"{type(exc).__name__}: {exc}"

    def get(self, name: str) -> Command:
        if name in self._broken:
            raise SlashError(f"/{name} is unavailable: its plugin failed to load ({self._broken[name]})")
        try:
            return self._commands[name]
        except KeyError:
            raise SlashError(f"unknown command /{name}; /help lists the available commands") from None

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    @property
    def broken(self) -> Mapping[str, str]:
        return dict(self._broken)


def _as_command(name: str, obj: Any) -> Command:
    if isinstance(obj, Command):
        return (
            obj
            if obj.name == name
            else Command(name, obj.usage.replace(f"/{obj.name}", f"/{name}", 1), obj.help, obj.run)
        )
    if callable(obj):
        doc = (getattr(obj, "__doc__", None) or "").strip()
        return Command(name, f"/{name}", doc.splitlines()[0] if doc else "(no help)", obj)
    raise TypeError(f"entry point object is neither a Command nor callable: {type(obj).__name__}")


# Execution ---------------------------------------------------------------------------------------------


def execute(registry: CommandRegistry, command: str, cwd: str, snapshot: Mapping[str, Any]) -> tuple[bool, str]:
    """Run one command line and return ``(ok, output)``; never raises for a user error."""
    text = command.strip()
    if not text.startswith("/") or len(text) < 2:
        return False, f"not a slash command: {command[:80]!r}; commands start with '/', e.g. /help"
    head, _, rest = text[1:].partition(" ")
    try:
        cmd = registry.get(head.strip())
        try:
            args = shlex.split(rest)
        except ValueError as exc:
            raise SlashError(f"cannot parse the arguments of /{cmd.name}: {exc}") from None
        base = Path(cwd).resolve()
        if not base.is_dir():
            raise SlashError(f"the session directory {cwd} does not exist any more")
        return True, cmd.run(SlashContext(base, snapshot, registry), args)
    except SlashError as exc:
        return False, str(exc)
    except Exception as exc:  # a bug in a command costs that command only
        logger.exception("slash command %s failed", head)
        return False, f"/{head} failed: {type(exc).__name__}: {exc}"


# Built-in commands -------------------------------------------------------------------------------------


def _cmd_help(ctx: SlashContext, args: list[str]) -> str:
    commands = sorted(ctx.registry, key=lambda c: c.name)
    width = max(len(c.usage) for c in commands)
    lines = [f"{c.usage.ljust(width)}  {c.help}" for c in commands]
    lines += [f"/{name}  unavailable: {why}" for name, why in sorted(ctx.registry.broken.items())]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


_STATUS_FIELDS = (
    ("session_id", "session"),
    ("title", "title"),
    ("agent", "agent"),
    ("status", "status"),
    ("worker_pid", "worker pid"),
    ("uptime_s", "uptime"),
    ("turns", "turns"),
    ("queued", "queued prompts"),
    ("last_seq", "last seq"),
)
#: Shown only when the gateway passed them (the rest are always shown, as "unknown" when missing).
_OPTIONAL_FIELDS = frozenset({"session_id", "title", "status", "queued"})


def _cmd_status(ctx: SlashContext, args: list[str]) -> str:
    snap = dict(ctx.snapshot)
    snap.pop("cwd", None)  # shown below as the resolved directory the commands actually use
    lines = []
    for key, label in _STATUS_FIELDS:
        value = snap.pop(key, None)
        if value is None and key in _OPTIONAL_FIELDS:
            continue
        if key == "uptime_s" and isinstance(value, (int, float)):
            value = _duration(value)
        lines.append(f"{label}: {'unknown' if value is None else value}")
    lines += [f"{key}: {value}" for key, value in sorted(snap.items())]
    lines.append(f"directory: {ctx.cwd}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _cmd_ls(ctx: SlashContext, args: list[str]) -> str:
    if len(args) > 1:
        raise SlashError("usage: /ls [PATH]")
    raw = args[0] if args else "."
    target = ctx.confine(raw)
    if not target.exists():
        raise SlashError(f"no such file or directory: {raw}")
    if not target.is_dir():
        return f"{_size(target.stat().st_size):>10}  {ctx.shown(target)}"
    entries = sorted(os.scandir(target), key=lambda e: e.name)
    lines = []
    for entry in entries[:LS_MAX_ENTRIES]:
        if entry.is_symlink():
            lines.append(f"{'link':>10}  {entry.name}@")
        elif entry.is_dir():
            lines.append(f"{'dir':>10}  {entry.name}/")
        else:
            try:
                size = _size(entry.stat().st_size)
            except OSError:
                size = "?"
            lines.append(f"{size:>10}  {entry.name}")
    if len(entries) > LS_MAX_ENTRIES:
        lines.append(f"[{len(entries) - LS_MAX_ENTRIES} more entries not shown]")
    return "\n".join(lines) if lines else f"(empty directory: {ctx.shown(target)})"


def _looks_binary(head: bytes) -> bool:
    return b"\0" in head[:_BINARY_SNIFF]


def _cmd_cat(ctx: SlashContext, args: list[str]) -> str:
    if len(args) != 1:
        raise SlashError("usage: /cat FILE")
    target = ctx.confine(args[0])
    if target.is_dir():
        raise SlashError(f"{args[0]} is a directory; use /ls {args[0]}")
    if not target.is_file():
        raise SlashError(f"no such file: {args[0]}")
    size = target.stat().st_size
    with open(target, "rb") as fh:
        raw = fh.read(OUTPUT_CAP + _SCRUB_MARGIN)
    if _looks_binary(raw):
        return f"{ctx.shown(target)} looks binary ({_size(size)}); not shown"
    text, _ = scrub(raw.decode("utf-8", errors="replace"))
    if len(text) > OUTPUT_CAP or size > len(raw):
        text = text[:OUTPUT_CAP] + f"\n[truncated: showing the first {OUTPUT_CAP // 1024} KiB of {_size(size)}]"
    return text


def _walk_files(ctx: SlashContext, root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in GREP_SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_symlink():  # follow a link only when it stays inside the session directory
                resolved = path.resolve()
                if resolved != ctx.cwd and ctx.cwd not in resolved.parents:
                    continue
            yield path


def _open_regular(path: Path) -> io.BufferedReader | None:
    """``path`` opened for reading if it is a regular file, else None.  Opened non-blocking first, so even
    a FIFO put in place after the walk saw a file cannot block the worker."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _cmd_grep(ctx: SlashContext, args: list[str]) -> str:
    if not 1 <= len(args) <= 2:
        raise SlashError("usage: /grep PATTERN [PATH]")
    try:
        pattern = re.compile(args[0])
    except re.error as exc:
        raise SlashError(f"invalid regular expression {args[0]!r}: {exc}") from None
    raw_root = args[1] if len(args) == 2 else "."
    root = ctx.confine(raw_root)
    if not root.exists():
        raise SlashError(f"no such file or directory: {raw_root}")
    lines: list[str] = []
    total = 0
    skipped_large = 0
    stopped = ""
    for path in _walk_files(ctx, root):
        try:
            raw = _open_regular(path)
            if raw is None:  # a FIFO, socket or device: reading it could block or never end
                continue
            with raw:
                if os.fstat(raw.fileno()).st_size > GREP_MAX_FILE_BYTES:
                    skipped_large += 1
                    continue
                if _looks_binary(raw.read(_BINARY_SNIFF)):
                    continue
                raw.seek(0)
                fh = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
                for lineno, line in enumerate(fh, 1):
                    if not pattern.search(line):
                        continue
                    clean, _ = scrub(line.rstrip("\r\n"))
                    if len(clean) > GREP_MAX_LINE:
                        clean = clean[:GREP_MAX_LINE] + " [...]"
                    entry = f"{ctx.shown(path)}:{lineno}:{clean}"
                    lines.append(entry)
                    total += len(entry) + 1
                    if len(lines) >= GREP_MAX_MATCHES:
                        stopped = f"[stopped after {GREP_MAX_MATCHES} matching lines]"
                    elif total >= OUTPUT_CAP:
                        stopped = f"[stopped at {OUTPUT_CAP // 1024} KiB of output]"
                    if stopped:
                        break
        except OSError:
            continue  # unreadable or vanished while walking: skip it, as grep -s would
        if stopped:
            break
    if skipped_large:
        lines.append(f"[skipped {skipped_large} file(s) larger than {GREP_MAX_FILE_BYTES // (1024 * 1024)} MiB]")
    if stopped:
        lines.append(stopped)
    return "\n".join(lines) if lines else f"no matches for {args[0]!r} under {ctx.shown(root)}"


BUILTINS: tuple[Command, ...] = (
    Command("help", "/help", "list every command with one line of help", _cmd_help),
    Command("status", "/status", "the session: agent, worker pid, uptime, turns, last event seq", _cmd_status),
    Command("ls", "/ls [PATH]", "list a directory under the session directory", _cmd_ls),
    Command(
        "cat",
        "/cat FILE",
        f"show a file under the session directory (secrets redacted, first {OUTPUT_CAP // 1024} KiB)",
        _cmd_cat,
    ),
    Command(
        "grep",
        "/grep PATTERN [PATH]",
        "search files under the session directory with a Python regex "
        "(secrets redacted; hidden dirs, node_modules, __pycache__ skipped)",
        _cmd_grep,
    ),
)


def build_registry(load_plugins: bool = True) -> CommandRegistry:
    registry = CommandRegistry()
    for command in BUILTINS:
        registry.add(command)
    if load_plugins:
        registry.load_entry_points()
    return registry


# Process plumbing --------------------------------------------------------------------------------------


def _claim_stdout() -> int:
    """Keep fd 1 for frames under a private fd and point fd 1 (and ``sys.stdout``) at stderr."""
    frames_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return frames_fd


def _end_group() -> None:
    """End this worker's session at once: its keeper SIGKILLs everything a command started."""
    keeper.end_now()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(registry: CommandRegistry, in_fd: int, out_fd: int) -> None:
    """Answer ``exec`` requests until EOF on ``in_fd``."""
    decoder = FrameDecoder()
    while True:
        data = os.read(in_fd, 65536)
        if not data:
            decoder.eof()
            return
        for frame in decoder.feed(data):
            if frame.kind is not Kind.CONTROL or frame.name != "exec":
                continue
            request = frame.json()
            ok, output = execute(
                registry, str(request.get("command", "")), str(request.get("cwd", ".")), request.get("snapshot") or {}
            )
            _write_all(out_fd, control_frame("result", {"id": request.get("id"), "ok": ok, "output": output}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slash_worker", description="slash-command worker (see module doc)")
    parser.add_argument("--parent-pid", type=int, required=True, help="the gateway's pid (watched)")
    parser.add_argument("--poll", type=float, default=0.5, help=f"watchdog period, s (floor {WATCHDOG_FLOOR_S})")
    parser.add_argument("--nice", type=int, default=0, help="nice increment (keeps the gateway's loop first)")
    parser.add_argument("--kill-grace", type=float, default=2.0, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="slash_worker %(levelname)s %(message)s")
    frames_fd = _claim_stdout()
    keeper.fork_kept(
        gateway_pid=args.parent_pid,
        lifeline_fd=0,
        signals=(signal.SIGTERM, signal.SIGKILL),
        step_s=args.kill_grace,
        graceful_on_child_exit=False,
        poll_s=max(WATCHDOG_FLOOR_S, args.poll),
    )
    priority.lower(args.nice)  # the slash worker proper only (see workers/priority.py), not its keeper
    registry = build_registry()
    # Announce readiness so the gateway's per-command timeout never counts this interpreter's start-up.
    _write_all(frames_fd, control_frame("ready", {"pid": os.getpid()}))
    try:
        serve(registry, 0, frames_fd)
    except (ChannelError, BrokenPipeError) as exc:
        logger.warning("request channel broken: %s", exc)
    _end_group()  # EOF: the session is gone; nothing of this group may outlive it
    return 0


if __name__ == "__main__":
    # Run the module under its own name: a plugin's ``from slash_worker import Command`` must get the very
    # class the registry checks against, not a second copy next to ``__main__``.
    from slash_worker import main as _canonical_main

    sys.exit(_canonical_main())
