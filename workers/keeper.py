"""The session keeper: a small parent process that outlives everything a session starts, and ends it.

A process started by a session may leave the session's process group and session (``setsid``,
``setpgid``) and its parent may exit at once (double fork), so neither ``killpg`` nor a kill of the session
id reaches it, and the kernel hands it to init.  The keeper closes that hole: it is the session leader,
marks itself a *child subreaper* before it forks anything, and forks the real process (the agent worker,
the slash worker, the terminal's program) as its child.  Every orphan below it is then reparented to the
keeper, not to init, so the keeper can always see it (``/proc/<keeper>/task/*/children``) and kill it.

The keeper ends the session when it is asked to (a signal from the gateway), when the gateway dies (a
pidfd) or hangs up (the lifeline pipe), or when its child exits; then it exits itself with the child's
status, so its parent sees the same exit it would have seen from the child.  It blocks in ``poll()`` and
holds no GIL-heavy work, so it reacts even while the child's main thread is stuck in C code.

Signals the keeper understands (everything else that a terminal sends its foreground group is ignored):

- ``SIGTERM`` / ``SIGHUP``: graceful: the ``signals`` sequence, ``step_s`` apart, each step skipped once
  nothing is left, then SIGKILL sweeps until a scan finds nothing;
- ``SIGUSR1``: now: SIGKILL sweeps at once (``interrupt`` of a stuck turn, a gateway that went away).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence

from workers import contain

END_NOW = signal.SIGUSR1
_GRACEFUL = (signal.SIGTERM, signal.SIGHUP)
#: Signals a terminal sends its foreground process group, which the keeper belongs to: ignored.
_IGNORED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE)
_HANDLED = (*_GRACEFUL, END_NOW, signal.SIGCHLD)
_STEP_POLL_S = 0.01
_SWEEP_TIMEOUT_S = 5.0
#: After the sweep, how long to wait for the child's own wait status (it may still be exiting: a process
#: the scan no longer lists is not always reapable yet).
_CHILD_STATUS_WAIT_S = 2.0
_MIN_POLL_S = 0.05

#: In the kept child: the keeper's pid (None in any other process).
keeper_pid: int | None = None


def fork_kept(
    *,
    gateway_pid: int,
    lifeline_fd: int | None,
    signals: Sequence[int],
    step_s: float,
    graceful_on_child_exit: bool,
    poll_s: float = 0.5,
    keep_stderr: bool = True,
    child_own_group: bool = False,
    on_forked: Callable[[int], None] | None = None,
) -> None:
    """Split the calling session leader into a keeper and its kept child.  Returns in the child only; the
    keeper runs until the session is over and then exits the process (``os._exit``).

    Call before any thread starts.  ``lifeline_fd``: a pipe read end whose hang-up means the gateway is
    gone (never read).  ``signals``: the graceful sequence (e.g. SIGTERM, SIGKILL); ``step_s`` apart.
    ``graceful_on_child_exit``: whether what the child leaves behind gets the graceful sequence too (a
    terminal's background jobs) or is killed at once (an agent worker's).  ``keep_stderr``: False when
    fd 2 is a terminal the keeper must not hold open.  ``child_own_group``: the child leads a process group
    of its own (inside the keeper's session), so that group is the child and what it starts.
    ``on_forked(child_pid)``: run in the keeper right after the fork, before it drops its descriptors."""
    global keeper_pid
    contain.become_subreaper()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (*_HANDLED, *_IGNORED)}
    for sig in _HANDLED:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(wake_w)
    parent = os.getpid()
    child = os.fork()
    if child_own_group:  # both sides, so neither can act on the child before it leads its group
        try:
            os.setpgid(0 if child == 0 else child, 0 if child == 0 else child)
        except OSError:
            pass
    if child == 0:
        signal.set_wakeup_fd(-1)
        for sig, handler in previous.items():  # e.g. Python's own SIGPIPE ignore and SIGINT handler
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        os.close(wake_r)
        os.close(wake_w)
        contain.die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # the keeper died before the death signal was armed
            os._exit(1)
        keeper_pid = parent
        return
    status = None
    try:
        if on_forked is not None:
            on_forked(child)
        status = _Keeper(
            child,
            gateway_pid,
            lifeline_fd,
            (wake_r, wake_w),
            received,
            tuple(signals),
            step_s,
            graceful_on_child_exit,
            poll_s,
            keep_stderr,
        ).run()
    finally:
        _exit_like(status)


def end_now() -> None:
    """From the kept child: have the keeper end the whole session at once (then wait to be killed)."""
    if keeper_pid is not None:
        try:
            os.kill(keeper_pid, END_NOW)
            return
        except OSError:
            pass
    os.killpg(0, signal.SIGKILL)


class _Keeper:
    def __init__(
        self,
        child: int,
        gateway_pid: int,
        lifeline_fd: int | None,
        wake_fds: tuple[int, int],
        received: list[int],
        signals: tuple[int, ...],
        step_s: float,
        graceful_on_child_exit: bool,
        poll_s: float,
        keep_stderr: bool,
    ) -> None:
        self._child = child
        self._gateway_pid = gateway_pid
        self._received = received
        self._signals = signals or (signal.SIGKILL,)
        self._step_s = step_s
        self._graceful_on_child_exit = graceful_on_child_exit
        self._child_status: int | None = None
        self._sid = os.getsid(0)
        self._me = os.getpid()
        self._gateway_fd = _pidfd(gateway_pid)
        wake_fd = wake_fds[0]
        keep = {*wake_fds, 2} if keep_stderr else {*wake_fds}
        if lifeline_fd is not None:
            keep.add(lifeline_fd)
        if self._gateway_fd is not None and self._gateway_fd >= 0:
            keep.add(self._gateway_fd)
        _close_all_but(keep)
        _quiet_stdio(keep)
        self._poller = select.poll()
        self._poller.register(wake_fd, select.POLLIN)
        self._wake_fd = wake_fd
        if lifeline_fd is not None:
            self._poller.register(lifeline_fd, 0)  # POLLHUP / POLLERR only: its data is not ours
        if self._gateway_fd is not None and self._gateway_fd >= 0:
            self._poller.register(self._gateway_fd, select.POLLIN)
        self._timeout_ms = None if self._gateway_fd is not None else int(max(poll_s, _MIN_POLL_S) * 1000)

    def run(self) -> int | None:
        """Wait for a reason to end, end the session, and return the child's wait status."""
        if self._gateway_fd == -1:  # the gateway was already gone
            return self._end(graceful=False)
        while True:
            try:
                events = self._poller.poll(self._timeout_ms)
            except InterruptedError:
                events = []
            self._drain_wakeups()
            self._reap()
            if END_NOW in self._received:
                return self._end(graceful=False)
            if any(sig in self._received for sig in _GRACEFUL):
                return self._end(graceful=True)
            if self._child_status is not None:
                return self._end(graceful=self._graceful_on_child_exit)
            if any(fd != self._wake_fd for fd, _ in events) or not _gateway_alive(self._gateway_pid, self._gateway_fd):
                return self._end(graceful=False)

    def _end(self, *, graceful: bool) -> int | None:
        if graceful:
            for sig in self._signals:
                if sig == signal.SIGKILL:
                    break
                if not self._send_all(sig):
                    break
                self._wait_empty(self._step_s)
        contain.kill_session(self._sid, root=self._me, timeout=_SWEEP_TIMEOUT_S, reap=self._reap)
        self._reap()
        self._wait_child_status()
        return self._child_status

    def _wait_child_status(self) -> None:
        """Collect the child's status if the sweep finished before it could be reaped: a killed process
        leaves the scan while the kernel is still tearing it down, and without this the keeper reported
        its end as "status lost" (255) now and then under load."""
        deadline = time.monotonic() + _CHILD_STATUS_WAIT_S
        while self._child_status is None and time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self._child, os.WNOHANG)
            except ChildProcessError:
                return  # reaped elsewhere, or never ours: nothing to wait for
            if pid == self._child:
                self._child_status = status
                return
            time.sleep(_STEP_POLL_S / 10)

    def _targets(self) -> list[contain.ProcInfo]:
        return contain.session_targets(self._sid, root=self._me, exclude=(self._me,))

    def _send_all(self, sig: int) -> bool:
        targets = self._targets()
        for info in targets:
            contain.send(info, sig)
        return bool(targets)

    def _wait_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap()
            if END_NOW in self._received or not self._targets():
                return
            time.sleep(_STEP_POLL_S)

    def _reap(self) -> None:
        for pid, status in contain.reap_children().items():
            if pid == self._child:
                self._child_status = status

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_fd, 512):
                pass
        except (BlockingIOError, OSError):
            pass


def _exit_like(status: int | None) -> None:
    """End the keeper the way its child ended: same exit code, or killed by the same signal."""
    if status is None:
        os._exit(255)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.set_wakeup_fd(-1)
        try:
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGKILL)  # a signal whose default is not to die (e.g. SIGCHLD)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 255)


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``; -1 if the process does not exist; None if pidfds are unavailable."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    except (AttributeError, OSError):
        return None


def _gateway_alive(pid: int, fd: int | None) -> bool:
    if fd is not None:
        return True  # a pidfd reports the death through poll()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _quiet_stdio(keep: set[int]) -> None:
    """Point fds 0, 1 and 2 at /dev/null unless kept: the keeper must not hold the child's pipes or terminal
    (the gateway waits for their EOF), yet a stray write must not land on a reused descriptor."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep:
            os.dup2(devnull, fd)
    if devnull not in keep and devnull > 2:
        os.close(devnull)


def _close_all_but(keep: set[int]) -> None:
    """Drop every inherited descriptor except ``keep``, so the keeper never delays an EOF someone waits for."""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    try:
        high = os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        high = 65536
    os.closerange(low, high)


# A program on a terminal --------------------------------------------------------------------------------


def run_program(argv: Sequence[str]) -> int:
    """``keeper.py --parent-pid PID --step S --status-fd FD -- PROGRAM ARGS...``: keep ``PROGRAM`` (started
    by ``pty_bridge`` as the session leader on a PTY).  One line goes to the status fd: ``ok <pid>`` once
    the program is exec'd, or ``err <errno>`` if it could not be (then the keeper exits 127)."""
    args = list(argv)
    split = args.index("--")
    opts, program = dict(zip(args[:split:2], args[1:split:2], strict=False)), args[split + 1 :]
    gateway_pid, step_s, status_fd = int(opts["--parent-pid"]), float(opts["--step"]), int(opts["--status-fd"])
    os.set_inheritable(status_fd, False)
    exec_r, exec_w = os.pipe()  # close-on-exec: EOF without data means the exec succeeded

    def report(child: int) -> None:
        os.close(exec_w)
        failure = b""
        while chunk := os.read(exec_r, 64):
            failure += chunk
        os.close(exec_r)
        line = f"err {failure.decode()}\n" if failure else f"ok {child}\n"
        os.write(status_fd, line.encode())
        os.close(status_fd)

    fork_kept(
        gateway_pid=gateway_pid,
        lifeline_fd=None,
        signals=(signal.SIGHUP, signal.SIGTERM, signal.SIGKILL),
        step_s=step_s,
        graceful_on_child_exit=True,
        keep_stderr=False,
        on_forked=report,
    )
    os.close(exec_r)
    os.close(status_fd)
    for sig in (*_IGNORED, signal.SIGXFSZ):  # an ignored signal stays ignored across exec: the program
        signal.signal(sig, signal.SIG_DFL)  # gets the defaults a shell expects (as subprocess does)
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        os.write(exec_w, str(exc.errno or 0).encode())
    os._exit(127)


if __name__ == "__main__":
    # Run by path (``pty_bridge`` starts it): import the package copy, not a second module next to __main__.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from workers.keeper import run_program as _run_program

    sys.exit(_run_program(sys.argv[1:]))
