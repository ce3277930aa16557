"""Start a private gateway (or any server with a ready line) as a subprocess, and end it on every path.

The one copy of "spawn a gateway" that the tests (``tests/conftest.py``), the benchmarks
(``bench/procs.py``) and ``worker-gateway loadtest --spawn`` share: start ``python -m gateway serve
--port 0 ...`` the way a user does, read its ``WORKER_GATEWAY_READY port=N`` line with a deadline (never
block on a gateway that failed to start), keep draining its stdout so it can never block on a full pipe,
and stop it with SIGTERM, waiting for it (SIGKILL only after the grace).  A failed start raises
:class:`SpawnError` carrying the gateway's stderr.  Whoever calls :meth:`ReadyLineProcess.start` owns the
process: ``stop()`` (or ``with``) ends it, and it only ever signals the pid it started.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from gateway.wire import READY_LINE_PREFIX

#: Arguments every gateway the project spawns for its own purposes gets, before the caller's.  Whatever
#: they are, a gateway whose arguments name no ``--state-dir`` / ``--no-state`` gets a fresh temporary state
#: dir (:func:`gateway_command`), so that no test, benchmark or ``loadtest --spawn`` ever contends with a
#: user's running gateway for the default state dir's lock, and each runs with the store on, as users do.
DEFAULT_GATEWAY_ARGS: tuple[str, ...] = ()

#: The directory that holds the ``gateway`` package: put on the child's PYTHONPATH so ``-m gateway`` is
#: this source tree whatever the caller's working directory.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


class SpawnError(RuntimeError):
    """The server did not get ready (exited, printed something else, or nothing within the deadline)."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(f"{message}\n{stderr}" if stderr else message)
        self.reason = message
        self.stderr = stderr


def child_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a spawned process: ours, unbuffered output, this source tree importable, then
    ``overrides`` (a ``None`` value removes that variable)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def gateway_command(
    *args: str, token: str | None = None, python: str = sys.executable, defaults: Sequence[str] = DEFAULT_GATEWAY_ARGS
) -> list[str]:
    """``python -m gateway serve --port 0`` with ``defaults``, the token and ``args``.

    ``--token=T``, not ``--token T``: a token may start with ``-`` and would be read as a flag.
    """
    command = [python, "-m", "gateway", "serve", "--port", "0", *defaults]
    if not any(a.startswith(("--state-dir", "--no-state")) for a in (*defaults, *args)):
        command.append("--state-dir=" + _temporary_state_dir())
    if token:
        command.append(f"--token={token}")
    return command + list(args)


_STATE_DIRS: list[str] = []


def _temporary_state_dir() -> str:
    """A fresh state dir for one spawned gateway, removed when this process exits (tests and benchmarks
    start hundreds; some write gigabytes)."""
    if not _STATE_DIRS:
        atexit.register(_remove_state_dirs)
    path = tempfile.mkdtemp(prefix="wg-state-")
    _STATE_DIRS.append(path)
    return path


def _remove_state_dirs() -> None:
    while _STATE_DIRS:
        shutil.rmtree(_STATE_DIRS.pop(), ignore_errors=True)


class ReadyLineProcess:
    """A server subprocess that prints ``<ready_prefix> port=N`` on stdout once it accepts connections."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready_prefix: str = READY_LINE_PREFIX,
        name: str = "server",
        env: Mapping[str, str | None] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.ready_prefix = ready_prefix
        self.name = name
        self.env_overrides = dict(env or {})
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.ready_line = ""
        self.exit_code: int | None = None
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self._drain: threading.Thread | None = None

    def command(self) -> list[str]:
        return list(self.argv)

    # Start ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> ReadyLineProcess:
        """Start it and return once its ready line was read; on failure it is stopped and SpawnError raised."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env(self.env_overrides),
        )
        try:
            line = self._read_ready_line(timeout)
            match = re.match(rf"{re.escape(self.ready_prefix)} port=(\d+)", line)
            if not match:
                raise SpawnError(f"{self.name} printed {line!r} instead of its ready line", self.stderr_tail())
        except BaseException:
            self._terminate(5.0)
            raise
        self.ready_line = line
        self.port = int(match.group(1))
        # Keep draining stdout so that a chatty server can never block on a full pipe.
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True, name=f"{self.name}-stdout")
        self._drain.start()
        return self

    def _read_ready_line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SpawnError(
                        f"{self.name} printed no ready line within {timeout:g}s (got {buf!r})", self.stderr_tail()
                    )
                if not sel.select(min(remaining, 0.5)):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self.proc.wait(5)
                    raise SpawnError(f"{self.name} exited with status {code} before it was ready", self.stderr_tail())
                buf += chunk
        return buf.split(b"\n", 1)[0].decode(errors="replace").strip()

    def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            while self.proc.stdout.read(65536):
                pass

    # Inspect -------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        # pread, not seek + read: the child shares this file's offset, and a seek back to 0 would make
        # its next write overwrite the start of the log.
        fd, chunks, offset = self._stderr.fileno(), [], 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stderr_tail(self, limit: int = 3000) -> str:
        return self.stderr()[-limit:]

    # Stop ----------------------------------------------------------------------------------------------
    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (a gateway's graceful shutdown ends every worker group), wait up to ``grace`` seconds,
        then SIGKILL; returns the exit status (``None`` if it never started).  Idempotent."""
        return self._terminate(grace)

    def _terminate(self, grace: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._finish()
        return self.exit_code

    def kill(self) -> None:
        """SIGKILL at once (for a test that simulates a crash, or a server that hangs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._finish()

    def _finish(self) -> None:
        assert self.proc is not None
        self.exit_code = self.proc.returncode
        if self._drain is not None:
            self._drain.join(2)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()

    def __enter__(self) -> ReadyLineProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class SpawnedGateway(ReadyLineProcess):
    """``python -m gateway serve --port 0 [--token=T] *args`` on 127.0.0.1.

    :param args: extra ``serve`` arguments (after :data:`DEFAULT_GATEWAY_ARGS`).
    :param token: passed as ``--token=T``; ``None`` lets the gateway generate one (or read its env).
    :param env: environment overrides for the gateway (``None`` values remove a variable).
    :param defaults: arguments before ``args`` (:data:`DEFAULT_GATEWAY_ARGS` unless given).
    """

    def __init__(
        self,
        *args: str,
        token: str | None = None,
        env: Mapping[str, str | None] | None = None,
        cwd: str | Path | None = None,
        name: str = "the spawned gateway",
        defaults: Sequence[str] = DEFAULT_GATEWAY_ARGS,
    ) -> None:
        super().__init__([], ready_prefix=READY_LINE_PREFIX, name=name, env=env, cwd=cwd)
        self.args = list(args)
        self.token = token
        self.defaults = tuple(defaults)

    def command(self) -> list[str]:
        return gateway_command(*self.args, token=self.token, defaults=self.defaults)

    def start(self, timeout: float = 30.0) -> SpawnedGateway:
        super().start(timeout)
        return self

    def __enter__(self) -> SpawnedGateway:
        return self.start() if self.proc is None else self

    def url(self, path: str = "/ws", token: bool = True) -> str:
        """``ws://127.0.0.1:PORT/path``, with ``?token=`` unless ``token=False``."""
        query = f"?token={self.token}" if token and self.token else ""
        return f"ws://127.0.0.1:{self.port}{path}{query}"

    def http(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"
