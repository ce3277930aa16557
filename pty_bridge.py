"""Terminals on pseudo-terminals: spawn under a session keeper, resize, and teardown of the terminal's session.

The gateway owns the master side of each PTY and reads it non-blocking on its loop
(``gateway/terminals/``); this module owns the child.  ``PtyProcess.spawn`` starts ``argv`` on the
slave as the leader of a new *session* (so also of a new process group) with the slave as its controlling
terminal, which gives the shell job control and ``SIGWINCH`` on resize.

Teardown targets the whole session, not only the leader's process group: an interactive shell with job
control moves every job (``sleep 300 &``) into a process group of its own inside the same session, so
``killpg(leader)`` alone would leave those jobs running.  ``PtyProcess.terminate`` signals every process of
the session (found by ``getsid``) plus the leader's descendants that escaped with ``setsid``.

If the gateway itself is killed (``kill -9``) nothing in the gateway can run a teardown.  The kernel then
hangs up the terminal (``SIGHUP`` to the session leader only, which is not enough for shells such as
``dash`` or for jobs that ignore ``SIGHUP``), so a *warden* process (``python pty_bridge.py --warden
--parent-pid PID``) watches the gateway: the gateway tells it, one line per change on its stdin, which
sessions exist (``+SID`` / ``-SID``), and when that pipe reaches EOF or the gateway's pid is gone it ends
every session still listed, then exits.  One warden serves every terminal of a gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Iterable, Mapping, Sequence

import psutil

from workers import priority
from workers.process import KeptProcess

if sys.platform != "win32":
    import fcntl
    import termios

MIN_COLS, MAX_COLS = 1, 2000
MIN_ROWS, MAX_ROWS = 1, 1000
DEFAULT_COLS, DEFAULT_ROWS = 80, 24
#: Seconds between the SIGHUP, SIGTERM and SIGKILL of a teardown.
SIGNAL_STEP_S = 0.5
#: Seconds to wait for processes to vanish after SIGKILL (they cannot refuse; this only bounds a D state).
_KILL_WAIT_S = 3.0
_POLL_S = 0.025
_WATCHDOG_FLOOR_S = 0.05
KEEPER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "keeper.py")


# Pure helpers ------------------------------------------------------------------------------------------


def clamp_size(cols: int, rows: int) -> tuple[int, int]:
    """Clamp a requested size to what the protocol allows (cols 1..2000, rows 1..1000)."""
    return max(MIN_COLS, min(MAX_COLS, int(cols))), max(MIN_ROWS, min(MAX_ROWS, int(rows)))


def default_argv(environ: Mapping[str, str] | None = None) -> list[str]:
    """The user's login shell: ``$SHELL``, else the passwd entry, else ``/bin/sh``."""
    environ = os.environ if environ is None else environ
    shell = environ.get("SHELL", "").strip()
    if not shell:
        try:
            import pwd  # POSIX only: this module must stay importable on Windows (terminal.open says 4010)

            shell = pwd.getpwuid(os.getuid()).pw_shell.strip()
        except (ImportError, KeyError, OSError):
            shell = ""
    if not shell or not os.access(shell, os.X_OK):
        shell = "/bin/sh"
    return [shell]


def terminal_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the gateway's, with ``TERM=xterm-256color`` when unset and without the
    gateway's auth token (a program in the terminal has no business reading it from its environment)."""
    env = dict(os.environ if base is None else base)
    env.pop("WORKER_GATEWAY_TOKEN", None)
    if not env.get("TERM"):
        env["TERM"] = "xterm-256color"
    return env


# Session membership ------------------------------------------------------------------------------------


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live (non-zombie) process whose session id is ``sid``."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) != sid:
                continue
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _live(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _send(procs: Iterable[psutil.Process], pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in procs:
        try:
            proc.send_signal(sig)
            # A stopped job (^Z) only acts on SIGHUP/SIGTERM once continued, as the kernel does on hangup.
            if sig != signal.SIGKILL and proc.status() == psutil.STATUS_STOPPED:
                proc.send_signal(signal.SIGCONT)
        except psutil.Error:
            continue


class _Targets:
    """The processes a teardown must end: the session's members, plus descendants seen at the start that
    may have left the session with ``setsid`` (tracked by ``psutil.Process``, so a reused pid is no target)."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self._escaped: dict[int, psutil.Process] = {}
        try:
            for child in psutil.Process(sid).children(recursive=True):
                self._escaped[child.pid] = child
        except psutil.Error:
            pass

    def alive(self) -> list[psutil.Process]:
        members = {p.pid: p for p in session_processes(self.sid)}
        for pid, proc in self._escaped.items():
            members.setdefault(pid, proc)
        return _live(members.values())


# The process -------------------------------------------------------------------------------------------


class PtyState(enum.Enum):
    RUNNING = "running"
    TERMINATING = "terminating"
    EXITED = "exited"


class PtyProcess:
    """A program on a pseudo-terminal, under its session's keeper.  Create with :meth:`spawn`.

    The keeper (``workers/keeper.py``) is the session leader on the PTY, a child subreaper, and the
    program's parent: whatever the program starts, even with ``setsid`` or a double fork, stays below it,
    and it ends all of it (SIGHUP, SIGTERM, SIGKILL, ``step_s`` apart) when asked, when the program exits,
    or when the gateway dies.  ``pid`` is the keeper's: the terminal's session id.

    The caller owns ``master_fd`` for I/O (it sets up its own readers); this object owns the child and the
    fd's lifetime: :meth:`terminate` ends the session, :meth:`close_master` closes the fd (idempotent).
    """

    def __init__(
        self, proc: asyncio.subprocess.Process, master_fd: int, cols: int, rows: int, program_pid: int, step_s: float
    ) -> None:
        self._proc = proc
        self._master_fd: int | None = master_fd
        self.cols, self.rows = cols, rows
        self.program_pid = program_pid
        self.state = PtyState.RUNNING
        self._step_s = step_s
        self._process = KeptProcess(proc.pid, proc.wait, lambda: proc.returncode)

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        cols: int = DEFAULT_COLS,
        rows: int = DEFAULT_ROWS,
        env: Mapping[str, str] | None = None,
        nice: int = 0,
        step_s: float = SIGNAL_STEP_S,
        start_timeout_s: float = 30.0,
    ) -> PtyProcess:
        """Start ``argv`` on a new PTY.  Raises ``OSError`` (e.g. ``FileNotFoundError``) if it cannot start."""
        if sys.platform == "win32":
            raise OSError("pseudo-terminals are not available on Windows")
        if not argv:
            raise ValueError("argv is empty")
        cols, rows = clamp_size(cols, rows)
        master, slave = os.openpty()
        status_r, status_w = os.pipe()
        try:
            _set_winsize(master, cols, rows)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                KEEPER_SCRIPT,
                "--parent-pid",
                str(os.getpid()),
                "--step",
                str(step_s),
                "--status-fd",
                str(status_w),
                "--",
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=terminal_env(env),
                start_new_session=True,
                pass_fds=(slave, status_w),
                preexec_fn=_child_setup(slave, nice),
            )
        except BaseException:
            os.close(master)
            os.close(status_r)
            raise
        finally:
            os.close(slave)  # the child has its copies; ours would keep the master from ever seeing EIO
            os.close(status_w)
        try:
            line = await asyncio.wait_for(_read_status(status_r), start_timeout_s)
        except BaseException:
            os.close(master)
            await KeptProcess(proc.pid, proc.wait, lambda: proc.returncode).aclose(step_s)
            raise
        finally:
            os.close(status_r)
        word, _, value = line.partition(" ")
        if word != "ok":
            os.close(master)
            await proc.wait()
            code = int(value) if value.strip().isdigit() else 0
            raise OSError(code, os.strerror(code) if code else "the program could not be started", argv[0])
        os.set_blocking(master, False)
        return cls(proc, master, cols, rows, int(value), step_s)

    @property
    def pid(self) -> int:
        """The keeper's pid, which is also the terminal's session id."""
        return self._proc.pid

    @property
    def master_fd(self) -> int:
        if self._master_fd is None:
            raise ValueError("the PTY master is closed")
        return self._master_fd

    @property
    def returncode(self) -> int | None:
        """The program's exit (the keeper exits with it, once the rest of the session is gone)."""
        return self._proc.returncode

    def resize(self, cols: int, rows: int) -> tuple[int, int]:
        """Set the window size (clamped); the kernel sends ``SIGWINCH`` to the foreground job."""
        cols, rows = clamp_size(cols, rows)
        if self._master_fd is not None:
            _set_winsize(self._master_fd, cols, rows)
        self.cols, self.rows = cols, rows
        return cols, rows

    async def wait(self) -> int:
        """Wait for the program to exit and its keeper to have ended the rest of its session."""
        code = await self._proc.wait()
        if self.state is PtyState.RUNNING:
            self.state = PtyState.EXITED
        return code

    async def terminate(self, step_s: float | None = None) -> int | None:
        """End every process of the terminal's session (the keeper's SIGHUP, SIGTERM, SIGKILL, ``step_s``
        apart), then sweep its session id.  Idempotent; never blocks the loop."""
        if self.state is PtyState.RUNNING:
            self.state = PtyState.TERMINATING
        step = self._step_s if step_s is None else step_s
        code = await self._process.aclose(3 * step + _KILL_WAIT_S)
        self.state = PtyState.EXITED
        return code

    def close_master(self) -> None:
        """Close the master fd.  The caller must have removed its loop readers/writers on it first."""
        if self._master_fd is not None:
            fd, self._master_fd = self._master_fd, None
            os.close(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _read_status(fd: int) -> str:
    """One line from the keeper's status pipe, read without blocking the loop ("" at EOF)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    data = b""
    while b"\n" not in data:
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, 256)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", "replace").strip()


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _child_setup(slave: int, nice: int):  # type: ignore[no-untyped-def]
    """The ``preexec_fn``.  ``subprocess`` has no option to acquire a controlling terminal, and without one
    a shell has no job control and never gets ``SIGWINCH``.  uvloop runs this before it has set up the
    child's stdio and possibly before ``setsid``, so it makes sure of both itself and uses the slave fd."""

    def setup() -> None:
        if os.getsid(0) != os.getpid():
            os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        if nice:
            os.nice(nice)
            # One attempt only (no thread can run here): terminals are not started in bursts, so the
            # kernel's rate limit on autogroup changes seldom refuses it.
            try:
                priority.set_autogroup_nice(nice)
            except Exception:  # a tuning: never fail the terminal's start over it
                pass

    return setup


# The warden --------------------------------------------------------------------------------------------


class Warden:
    """Gateway-side handle of the warden process (see the module docstring).  Best effort: if it cannot
    start, terminals still work and are still ended by every normal teardown path."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    async def start(cls, poll_s: float) -> Warden:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            os.path.abspath(__file__),
            "--warden",
            "--parent-pid",
            str(os.getpid()),
            "--poll",
            str(poll_s),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a signal aimed at the gateway's group must not take the warden with it
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def watch(self, sid: int) -> None:
        self._write(f"+{sid}\n")

    def forget(self, sid: int) -> None:
        self._write(f"-{sid}\n")

    def _write(self, line: str) -> None:
        # A few bytes per terminal open/close: far below the pipe buffer, so no drain is needed.
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.write(line.encode("ascii"))

    async def close(self, timeout: float = 5.0) -> None:
        """EOF on its stdin: the warden ends whatever it still watches (nothing, normally) and exits."""
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
            await self._proc.wait()


def end_sessions(sids: Iterable[int], step_s: float = SIGNAL_STEP_S) -> None:
    """Blocking teardown for the warden process: SIGHUP, SIGTERM, SIGKILL to every listed session."""
    targets = [_Targets(sid) for sid in sids]
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL):
        pending = [(t, t.alive()) for t in targets]
        pending = [(t, left) for t, left in pending if left]
        if not pending:
            return
        for t, left in pending:
            _send(left, t.sid, sig)
        deadline = time.monotonic() + (_KILL_WAIT_S if sig == signal.SIGKILL else step_s)
        while any(t.alive() for t, _ in pending) and time.monotonic() < deadline:
            time.sleep(_POLL_S)


def _parent_alive(parent: psutil.Process | None) -> bool:
    if parent is None:
        return False
    try:
        return parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def run_warden(parent_pid: int, poll_s: float) -> int:
    """The warden's loop: track ``+SID``/``-SID`` lines until EOF or the parent's death, then end them."""
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        parent: psutil.Process | None = psutil.Process(parent_pid)
    except psutil.Error:
        parent = None
    poll_s = max(_WATCHDOG_FLOOR_S, poll_s)
    watched: set[int] = set()
    pending = bytearray()

    def take_lines() -> bool:
        """Apply every complete line available now; True at EOF.  Also called once the parent is gone, so
        a ``+SID`` written just before the gateway died is still honoured."""
        while True:
            try:
                chunk = os.read(0, 4096)
            except BlockingIOError:
                return False
            if not chunk:
                return True
            pending.extend(chunk)
            *lines, rest = bytes(pending).split(b"\n")
            pending[:] = rest
            for line in lines:
                text = line.strip().decode("ascii", "replace")
                op, num = text[:1], text[1:]
                if num.isdigit() and op == "+":
                    watched.add(int(num))
                elif num.isdigit() and op == "-":
                    watched.discard(int(num))

    os.set_blocking(0, False)
    poller = select.poll()
    poller.register(0, select.POLLIN | select.POLLHUP)
    while True:
        poller.poll(poll_s * 1000)
        if take_lines() or not _parent_alive(parent):
            take_lines()
            break
    end_sessions(watched)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pty_bridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--warden", action="store_true", help="run the warden loop (see the module docstring)")
    parser.add_argument("--parent-pid", type=int, required=True, help="the gateway's pid")
    parser.add_argument("--poll", type=float, default=0.5, help="parent poll period in seconds (floor 0.05)")
    args = parser.parse_args(argv)
    if not args.warden:
        parser.error("only --warden mode can be run as a program")
    return run_warden(args.parent_pid, args.poll)


if __name__ == "__main__":
    sys.exit(main())
