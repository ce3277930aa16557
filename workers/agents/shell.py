"""``shell``: runs each prompt with ``/bin/sh -c`` in the session's cwd (PROTOCOL section 7).

The command stays in the worker's process group, so whatever it leaves running in the background ends
with the session.  stdout and stderr are merged and streamed as scrubbed ``tool.output`` events; the
stream is cut at line breaks (:class:`~workers.scrub.StreamBuffer`) so a secret split across two reads is
still redacted.  ``turn.complete`` carries ``exit_code`` (negative: killed by that signal).

:func:`run_command` is the runner itself, shared with the ``openai`` agent's ``shell`` tool (which adds a
timeout, an output cap and its own sink for the scrubbed output).
"""

from __future__ import annotations

import codecs
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
        outcome = run_command(text, self.cwd, turn, turn.tool_output)
        code = outcome.exit_code
        if outcome.interrupted:
            return TurnResult("interrupted", extra={"exit_code": code})
        if code != 0:
            return TurnResult("error", error=f"command exited with status {code}", extra={"exit_code": code})
        return TurnResult("ok", extra={"exit_code": code})


@dataclass(frozen=True)
class CommandOutcome:
    exit_code: int  #: negative: killed by that signal
    interrupted: bool = False  #: the turn was cancelled
    timed_out: bool = False
    truncated: bool = False  #: the output passed ``output_cap_bytes``: the command was stopped there


def run_command(
    command: str,
    cwd: str,
    turn: TurnHandle,
    sink: Callable[[str], object],
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    output_cap_bytes: int | None = None,
) -> CommandOutcome:
    """Run ``command`` with ``/bin/sh -c`` in ``cwd`` and this worker's process group, handing its output
    to ``sink`` as text cut at safe points for the scrubber.  Cancellation, the timeout and the output cap
    each stop the command and everything it started."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        close_fds=True,
    )
    assert proc.stdout is not None
    stream = _OutputStream(sink, output_cap_bytes)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        ended = _pump(proc, stream, turn, deadline)
    finally:
        proc.stdout.close()
    stream.finish()
    code = proc.wait()
    return CommandOutcome(
        code, interrupted=ended == "cancelled", timed_out=ended == "timeout", truncated=stream.truncated
    )


def _pump(proc: subprocess.Popen[bytes], stream: _OutputStream, turn: TurnHandle, deadline: float | None) -> str:
    """Relay output until the shell exits; says why it stopped: exited, cancelled, timeout or cap."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        stop = (
            "cancelled"
            if turn.cancelled
            else "cap"
            if stream.truncated
            else "timeout"
            if deadline is not None and time.monotonic() >= deadline
            else None
        )
        if stop is not None:
            _kill_tree(proc)
            return stop
        if poller.poll(_POLL_MS):
            data = os.read(fd, _READ_SIZE)
            if not data:
                return "exited"
            stream.feed(data)
        elif proc.poll() is not None:
            _drain(fd, stream)
            return "exited"


class _OutputStream:
    """Bytes of a command's output -> text cut at safe points -> the sink (which scrubs and emits)."""

    def __init__(self, sink: Callable[[str], object], cap_bytes: int | None = None) -> None:
        self._sink = sink
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffer = StreamBuffer()
        self._cap = cap_bytes
        self._taken = 0
        self.truncated = False

    def feed(self, data: bytes) -> None:
        if self.truncated:
            return
        if self._cap is not None and self._taken + len(data) > self._cap:
            data = data[: self._cap - self._taken]
            self.truncated = True
        self._taken += len(data)
        ready = self._buffer.feed(self._decoder.decode(data))
        if ready:
            self._sink(ready)

    def finish(self) -> None:
        rest = self._buffer.feed(self._decoder.decode(b"", final=True)) + self._buffer.flush()
        if rest:
            self._sink(rest)


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
