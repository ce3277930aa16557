"""The agent worker process: the main loop that serves one session.

Life of a worker (started idle by the supervisor's warm pool, through the forkserver):

1. become the leader of a new process group and session, lower its priority, and split into the session's
   keeper (``workers/keeper.py``: it ends everything the session started) and the worker proper, which
   takes the configured CPU scheduling policy (``worker_sched``: normal, batch or idle);
2. wait for CONTROL ``init`` {agent, options, cwd, session_id, sys_path, state_frame?} (and, with
   ``state_frame``, the CONTROL ``state`` frame after it, whose body is the session's last snapshot as
   the gateway kept it: decoded here, not on the gateway's loop); load the agent, hand it that state
   (``restore``) when present and not null, start it; answer ``ready`` {pid, agent} or ``init_failed``
   {code, message} (4004 unknown agent, 5001 anything else, a state that is not JSON included);
3. run ``prompt`` {turn_id, text} one at a time on the main thread, each framed by ``turn.start`` and
   exactly one ``turn.complete``, preceded by CONTROL ``state`` {state} when the agent has ``snapshot``;
   a reader thread takes ``cancel`` {turn_id} meanwhile and runs the turn's cancel callbacks at once;
4. when the control pipe from the gateway ends (or breaks), kill the whole group at once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import traceback
from typing import Any

from workers import keeper, priority
from workers.agents.base import TurnCancelled, TurnHandle, TurnResult
from workers.agents.registry import AgentLoadError, UnknownAgent, load_factory
from workers.channel import BlockingChannel, ChannelError, Frame, Kind, control_frame
from workers.ops import Op
from workers.scrub import set_extra_secrets

logger = logging.getLogger("worker_gateway.worker")

INIT_UNKNOWN_AGENT = 4004
INIT_FAILED = 5001


#: Config ``worker_sched``: the CPU scheduling policy of the worker proper (and what its turns start).
#: ``batch`` (SCHED_BATCH) marks it CPU-bound: the kernel stops preempting the gateway's relay loop in its
#: favour when it wakes; ``idle`` (SCHED_IDLE) runs it only on CPU time nothing else wants.
SCHED_POLICIES = ("normal", "batch", "idle")


def apply_sched(policy: str) -> bool:
    """Move this process to ``policy`` (one of :data:`SCHED_POLICIES`); False when the platform or the
    process's rights refuse it (the worker then runs as before: this is a tuning, not a guarantee)."""
    number = {"batch": getattr(os, "SCHED_BATCH", None), "idle": getattr(os, "SCHED_IDLE", None)}.get(policy)
    if number is None:
        return policy == "normal"
    try:
        os.sched_setscheduler(0, number, os.sched_param(0))
    except OSError as exc:  # EPERM (e.g. leaving SCHED_IDLE without CAP_SYS_NICE), or not supported
        logger.debug("worker %d: cannot use scheduling policy %s: %s", os.getpid(), policy, exc)
        return False
    return True


def main(
    read_fd: int,
    write_fd: int,
    gateway_pid: int,
    nice: int,
    watchdog_poll_s: float,
    kill_grace_s: float = 2.0,
    sched: str = "normal",
    group_nice: bool = True,
) -> None:
    """Entry point in the forked worker.  ``read_fd``/``write_fd`` are this side's pipe ends.  This process
    becomes the session's keeper (``workers/keeper.py``); the agent runs in its child.  ``group_nice``
    False: the supervisor sets the session's scheduling-group nice, this process only its own."""
    os.setsid()
    for fd in (read_fd, write_fd):  # fds received over SCM_RIGHTS are inheritable: keep them from commands
        os.set_inheritable(fd, False)
    # stdout belongs to the gateway (its ready line); anything an agent prints goes to stderr instead.
    os.dup2(2, 1)
    keeper.fork_kept(
        gateway_pid=gateway_pid,
        lifeline_fd=read_fd,
        signals=(signal.SIGTERM, signal.SIGKILL),
        step_s=kill_grace_s,
        graceful_on_child_exit=False,
        poll_s=watchdog_poll_s,
        child_own_group=True,
    )
    # The worker proper only: the keeper must stay prompt at ending the session.  The session's scheduling
    # group needs a nice too, or this one ranks the worker only inside that group (workers/priority.py);
    # the local supervisor sets it itself, by how many sessions run a turn (workers/group_nicer.py).
    priority.lower(nice, group=group_nice)
    apply_sched(sched)
    channel = BlockingChannel(read_fd, write_fd)
    try:
        _serve(channel)
    except (OSError, ChannelError, _GatewayGone) as exc:  # the gateway went away or the stream broke
        logger.debug("worker %d: channel closed: %s", os.getpid(), exc)
        _end_group()


def _serve(channel: BlockingChannel) -> None:
    frame = channel.recv()
    if frame is None:
        _end_group()
        return
    if frame.kind is not Kind.CONTROL or frame.name != Op.INIT:
        channel.send_control(
            Op.INIT_FAILED, {"code": INIT_FAILED, "message": f"expected an init frame, got {frame.name!r}"}
        )
        return
    body = frame.json()
    try:
        if body.pop("state_frame", False):
            body["state"] = _saved_state(channel)
        agent, name = _start_agent(body)
    except _InitError as exc:
        failed: dict[str, Any] = {"code": exc.code, "message": str(exc)}
        if exc.bad_state:
            failed["bad_state"] = True
        channel.send_control(Op.INIT_FAILED, failed)
        return
    channel.send_control(Op.READY, {"pid": os.getpid(), "agent": name})
    _Session(channel, agent).serve()


class _GatewayGone(BaseException):
    """The pipe to the gateway broke while a turn was emitting.  A BaseException, so that an agent's
    ``except Exception`` cannot swallow it and keep a session alive that nobody can see any more."""


class _InitError(Exception):
    def __init__(self, code: int, message: str, *, bad_state: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.bad_state = bad_state  # the saved state itself is unusable: the gateway drops it


def _start_agent(body: dict[str, Any]) -> tuple[Any, str]:
    name = body.get("agent")
    options = body.get("options") or {}
    cwd = body.get("cwd")
    if not isinstance(name, str) or not name:
        raise _InitError(INIT_UNKNOWN_AGENT, "init without an agent name")
    if not isinstance(options, dict):
        raise _InitError(INIT_FAILED, "agent options must be an object")
    set_extra_secrets(s for s in body.get("scrub_secrets") or () if isinstance(s, str))
    for entry in body.get("sys_path") or ():
        if isinstance(entry, str) and entry not in sys.path:
            sys.path.append(entry)
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as exc:
            raise _InitError(INIT_FAILED, f"cannot use cwd {cwd!r}: {exc.strerror}") from None
    try:
        factory = load_factory(name)
    except UnknownAgent as exc:
        raise _InitError(INIT_UNKNOWN_AGENT, str(exc)) from None
    except AgentLoadError as exc:
        raise _InitError(INIT_FAILED, str(exc)) from None
    try:
        agent = factory(options, os.getcwd())
    except Exception as exc:
        traceback.print_exc()
        raise _InitError(INIT_FAILED, f"agent {name!r} failed to start: {type(exc).__name__}: {exc}") from None
    _restore(agent, name, body.get("state"))
    try:
        start = getattr(agent, "start", None)
        if start is not None:
            start()
    except Exception as exc:
        traceback.print_exc()
        raise _InitError(INIT_FAILED, f"agent {name!r} failed to start: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(agent, "run_turn", None)):
        raise _InitError(INIT_FAILED, f"agent {name!r} has no run_turn(text, turn) method")
    return agent, name


def _saved_state(channel: BlockingChannel) -> Any:
    """The CONTROL ``state`` frame that follows an ``init`` with ``state_frame``, decoded."""
    frame = channel.recv()
    if frame is None:
        raise _GatewayGone()
    if frame.kind is not Kind.CONTROL or frame.name != Op.STATE:
        raise _InitError(INIT_FAILED, f"expected the saved state after init, got {frame.name!r}")
    try:
        return json.loads(frame.body)
    except (ValueError, RecursionError) as exc:  # only a broken or hostile earlier worker can have sent it
        raise _InitError(INIT_FAILED, f"the session's saved state is not JSON: {exc}", bad_state=True) from None


def _restore(agent: Any, name: str, state: Any) -> None:
    """Hand a fresh worker's agent the session's last snapshot.  A failure fails the start loudly (5001)
    rather than serving a conversation that silently lost its past; an agent that prefers to start empty
    catches its own errors in ``restore``."""
    if state is None:
        return
    restore = getattr(agent, "restore", None)
    if restore is None:
        return  # the state came from another agent or version: nothing here can use it
    try:
        restore(state)
    except Exception as exc:
        traceback.print_exc()
        raise _InitError(
            INIT_FAILED, f"agent {name!r} failed to restore its state: {type(exc).__name__}: {exc}"
        ) from None


class _Session:
    """Runs turns on the main thread; a daemon thread reads control frames (prompts, cancels)."""

    def __init__(self, channel: BlockingChannel, agent: Any) -> None:
        self._channel = channel
        self._agent = agent
        self._prompts: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._current: TurnHandle | None = None
        self._early_cancel: Any = None

    def serve(self) -> None:
        """Serve turns until the process ends: a worker's life ends by a signal to its group (stop) or
        by the control pipe closing, never by returning from here."""
        threading.Thread(target=self._read_controls, name="control-reader", daemon=True).start()
        while True:
            self._run_turn(self._prompts.get())

    def _read_controls(self) -> None:
        try:
            while (frame := self._channel.recv()) is not None:
                self._on_control(frame)
        except (OSError, ChannelError) as exc:
            logger.warning("worker %d: control channel failed: %s", os.getpid(), exc)
        # The gateway is gone: end the group now, even mid-turn (the watchdog would, a moment later).
        _end_group()

    def _on_control(self, frame: Frame) -> None:
        if frame.kind is not Kind.CONTROL or frame.name not in (Op.PROMPT, Op.CANCEL):
            logger.warning("worker %d: ignoring frame %s %r", os.getpid(), frame.kind.name, frame.name)
            return
        try:
            body = frame.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            logger.warning("worker %d: ignoring %r with a malformed body", os.getpid(), frame.name)
            return
        if frame.name == Op.PROMPT:
            self._prompts.put(body)
        else:
            self._cancel(body.get("turn_id"))

    def _cancel(self, turn_id: Any) -> None:
        with self._lock:
            current = self._current if self._current is not None and self._current.turn_id == turn_id else None
            if current is None:  # the prompt may still be queued here: cancel it as it starts
                self._early_cancel = turn_id
        if current is not None:
            current.cancel()  # runs the turn's cancel callbacks here, on the control thread, at once

    def _run_turn(self, body: dict[str, Any]) -> None:
        turn_id = body.get("turn_id")  # echoed as given: the gateway owns its type
        text = body.get("text")
        text = text if isinstance(text, str) else ""
        handle = TurnHandle(turn_id, self._emit)
        with self._lock:
            self._current = handle
            if self._early_cancel is not None and self._early_cancel == turn_id:
                handle.cancel()
                self._early_cancel = None
        self._channel.send_event("turn.start", {"turn_id": turn_id, "text": text})
        try:
            payload = self._complete_payload(turn_id, text, handle)
        finally:
            with self._lock:
                self._current = None
        state_error = self._send_snapshot()
        if state_error is not None:
            payload["state_error"] = state_error
        self._channel.send_event("turn.complete", payload)

    def _send_snapshot(self) -> str | None:
        """Send the agent's snapshot (CONTROL ``state``) before ``turn.complete``, so the gateway holds the
        state of every completed turn.  Returns an error message when the snapshot could not be taken: the
        turn's outcome stands, and the gateway keeps the previous state."""
        snapshot = getattr(self._agent, "snapshot", None)
        if snapshot is None:
            return None
        try:
            frame = control_frame(Op.STATE, {"state": snapshot()})
        except Exception as exc:  # raised, not JSON-able, or larger than a frame
            traceback.print_exc()
            return f"snapshot failed: {type(exc).__name__}: {exc}"
        self._channel.send(frame)
        return None

    def _emit(self, event_type: str, payload: dict[str, Any]) -> None:
        try:
            self._channel.send_event(event_type, payload)
        except OSError as exc:
            raise _GatewayGone() from exc

    def _complete_payload(self, turn_id: Any, text: str, handle: TurnHandle) -> dict[str, Any]:
        payload: dict[str, Any] = {"turn_id": turn_id}
        try:
            result = self._agent.run_turn(text, handle)
        except TurnCancelled:
            result = TurnResult("interrupted")
        except Exception as exc:
            traceback.print_exc()
            result = TurnResult("error", error=f"{type(exc).__name__}: {exc}")
        if not isinstance(result, TurnResult):
            result = TurnResult("interrupted" if handle.cancelled else "ok")
        payload.update({k: v for k, v in result.extra.items() if k not in ("turn_id", "status", "error")})
        payload["status"] = result.status
        if result.error is not None or result.status == "error":
            payload["error"] = result.error or "turn failed"
        return payload


def _end_group() -> None:
    """End this worker's session at once: the keeper SIGKILLs the worker and everything a turn started."""
    sys.stderr.flush()
    keeper.end_now()
    os.kill(os.getpid(), signal.SIGKILL)
