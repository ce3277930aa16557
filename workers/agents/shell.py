"""``shell``: runs each prompt with ``/bin/sh -c`` in the session's cwd (PROTOCOL section 7).

The command stays in the worker's process group, so whatever it leaves running in the background ends
with the session.  stdout and stderr are merged and streamed as scrubbed ``tool.output`` events; the
stream is cut at line breaks (:class:`~workers.scrub.StreamBuffer`) so a secret split across two reads is
still redacted.  ``turn.complete`` carries ``exit_code`` (negative: killed by that signal).
"""

from __future__ import annotations

import codecs
import os
import select
import signal
import subprocess

from workers.agents.base import Agent, TurnHandle, TurnResult
from workers.scrub import StreamBuffer

_POLL_MS = 100
_READ_SIZE = 64 * 1024
#: After the shell exits, background children may still hold its output pipe; take at most this much of
#: what they already wrote, then stop reading (a ``yes &`` must not keep the turn alive forever).
_DRAIN_AFTER_EXIT = 4 * 1024 * 1024
_CANCEL_GRACE_S = 0.5


class ShellAgent(Agent):
    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", text], cwd=self.cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, close_fds=True)
        assert proc.stdout is not None
        stream = _OutputStream(turn)
        try:
            interrupted = self._pump(proc, stream, turn)
        finally:
            proc.stdout.close()
        stream.finish()
        code = proc.wait()
        if interrupted:
            return TurnResult("interrupted", extra={"exit_code": code})
        if code != 0:
            return TurnResult("error", error=f"command exited with status {code}", extra={"exit_code": code})
        return TurnResult("ok", extra={"exit_code": code})

    def _pump(self, proc: subprocess.Popen[bytes], stream: _OutputStream, turn: TurnHandle) -> bool:
        """Relay output until the shell exits (True if cancelled)."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            if turn.cancelled:
                _kill_tree(proc)
                return True
            if poller.poll(_POLL_MS):
                data = os.read(fd, _READ_SIZE)
                if not data:
                    return False
                stream.feed(data)
            elif proc.poll() is not None:
                _drain(fd, stream)
                return False


class _OutputStream:
    """Bytes of a command's output -> text cut at safe points -> scrubbed events."""

    def __init__(self, turn: TurnHandle) -> None:
        self._turn = turn
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffer = StreamBuffer()

    def feed(self, data: bytes) -> None:
        ready = self._buffer.feed(self._decoder.decode(data))
        if ready:
            self._turn.tool_output(ready)

    def finish(self) -> None:
        rest = self._buffer.feed(self._decoder.decode(b"", final=True)) + self._buffer.flush()
        if rest:
            self._turn.tool_output(rest)


def _drain(fd: int, stream: _OutputStream) -> None:
    os.set_blocking(fd, False)
    taken = 0
    while taken < _DRAIN_AFTER_EXIT:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            return
        taken += len(data)
        stream.feed(data)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Stop the command and everything it started that is still its descendant (SIGTERM, then SIGKILL
    after a short grace).  Not the process group: that is the worker's own."""
    import psutil  # imported on first cancel only: keeps idle workers small

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    _signal_all(proc, descendants, signal.SIGTERM)
    try:
        proc.wait(_CANCEL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    # psutil checks each process's identity before signalling, so a recycled pid is never hit.
    _signal_all(proc, descendants, signal.SIGKILL)
    proc.wait()


def _signal_all(proc: subprocess.Popen[bytes], others: list, sig: signal.Signals) -> None:
    import psutil

    if proc.returncode is None:
        proc.send_signal(sig)
    for other in others:
        try:
            other.send_signal(sig)
        except psutil.Error:
            pass
