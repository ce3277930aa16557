"""Built-in agents and turn semantics, through real workers (PROTOCOL section 7)."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import sys
import time
from typing import Any

import psutil
import pytest

from support import alive
from worker_helpers import (  # noqa: F401  (supervisor is a fixture)
    LagMonitor, complete_of, run_turn, supervisor, wait_until)
from workers.agents.base import Agent, TurnHandle, TurnResult
from workers.agents.load import LoadPlan, LoadPromptError, fake_secrets, parse_plan
from workers.channel import Frame, Kind
from workers.ops import Op
from workers.scrub import MAX_CHUNK_BYTES, REDACTED
from workers.supervisor import SavedStateError, Supervisor

pytestmark = pytest.mark.timeout(60)


def texts(events: list, kind: str) -> list[str]:
    return [payload["text"] for name, payload in events if name == kind]


# -- echo -------------------------------------------------------------------------------------------------

async def test_echo_streams_one_delta_per_word(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("echo", {}, None, "s1")
    prompt = "  the quick\tbrown  fox "
    events = await run_turn(handle, prompt, turn_id="t7")
    assert events[0] == ("turn.start", {"turn_id": "t7", "text": prompt})
    deltas = texts(events, "message.delta")
    assert [d.strip() for d in deltas] == ["the", "quick", "brown", "fox"]
    assert "".join(deltas) == prompt
    assert complete_of(events) == {"turn_id": "t7", "status": "ok"}


async def test_turns_run_one_after_another(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("echo", {}, None, "s1")
    for n in range(3):
        events = await run_turn(handle, f"turn {n}", turn_id=f"t{n}")
        assert complete_of(events)["turn_id"] == f"t{n}"


# -- errors -----------------------------------------------------------------------------------------------

async def test_agent_exception_completes_the_turn_with_error_and_worker_keeps_serving(
        supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("agents_for_tests:Flaky", {}, None, "s1")
    done = complete_of(await run_turn(handle, "boom now", turn_id="t1"))
    assert done["status"] == "error" and "agent exploded on 'boom now'" in done["error"]
    assert complete_of(await run_turn(handle, "fine", turn_id="t2"))["status"] == "ok"


# -- shell ------------------------------------------------------------------------------------------------

async def test_shell_streams_scrubbed_output_and_reports_the_exit_code(supervisor: Supervisor, tmp_path) -> None:
    (tmp_path / "marker.txt").write_text("here\n")
    handle = await supervisor.acquire("shell", {}, str(tmp_path), "s1")
    key = "AKIA" + "IOSFODNN7EXAMPLE"
    events = await run_turn(handle, f"ls; echo out; echo {key} >&2; exit 3")
    output = "".join(texts(events, "tool.output"))
    assert "marker.txt" in output and "out" in output
    assert key not in output and REDACTED in output
    assert sum(p["redactions"] for n, p in events if n == "tool.output") == 1
    done = complete_of(events)
    assert done["status"] == "error" and done["exit_code"] == 3
    assert complete_of(await run_turn(handle, "true", turn_id="t2")) == {
        "turn_id": "t2", "status": "ok", "exit_code": 0}


async def test_shell_large_output_is_chunked(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("shell", {}, None, "s1")
    events = await run_turn(handle, "head -c 300000 /dev/zero | tr '\\0' 'a'")
    chunks = texts(events, "tool.output")
    assert sum(len(c) for c in chunks) == 300000
    assert all(len(c.encode()) <= MAX_CHUNK_BYTES for c in chunks)


async def test_shell_cancel_kills_the_command(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("shell", {}, None, "s1")
    handle.send("prompt", {"turn_id": "t1", "text": "echo started; sleep 120; echo never"})
    events = []
    start = None
    async for frame in handle.frames():
        events.append((frame.name, json.loads(frame.body)))
        if frame.name == "tool.output" and start is None:
            start = time.monotonic()
            handle.send("cancel", {"turn_id": "t1"})
        if frame.name == "turn.complete":
            break
    assert start is not None and time.monotonic() - start < 10  # far below the command's 120 s
    done = complete_of(events)
    assert done["status"] == "interrupted"
    assert "never" not in "".join(texts(events, "tool.output"))
    sleepers = [c for c in psutil.Process(handle.pid).children(recursive=True) if c.name() == "sleep"]
    assert not alive(sleepers)


# -- load: prompt grammar ---------------------------------------------------------------------------------

def test_load_prompt_defaults_and_values() -> None:
    assert parse_plan("") == LoadPlan()
    assert parse_plan("cpu_s=1.5 gil=regex output_mb=2 chunk_kb=8 subagents=3 secrets=4") == LoadPlan(
        cpu_s=1.5, gil="regex", output_mb=2.0, chunk_kb=8, subagents=3, secrets=4)


@pytest.mark.parametrize("prompt, key", [
    ("cpu=1", "cpu"), ("cpu_s=abc", "cpu_s"), ("cpu_s=-1", "cpu_s"), ("cpu_s=nan", "cpu_s"),
    ("gil=rust", "gil"), ("chunk_kb=65", "chunk_kb"), ("chunk_kb=0", "chunk_kb"), ("subagents=1.5", "subagents"),
    ("secrets=-2", "secrets"), ("output_mb=inf", "output_mb"), ("justaword", "justaword"),
])
def test_load_prompt_errors_name_the_key(prompt: str, key: str) -> None:
    with pytest.raises(LoadPromptError, match=key):
        parse_plan(prompt)


async def test_load_bad_prompt_completes_with_error(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("load", {}, None, "s1")
    done = complete_of(await run_turn(handle, "cpu_s=1 colour=blue"))
    assert done["status"] == "error" and "colour" in done["error"]


# -- load: behaviour --------------------------------------------------------------------------------------

async def test_load_output_is_scrubbed_and_chunked(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("load", {}, None, "s1")
    events = await run_turn(handle, "secrets=5 output_mb=1")
    chunks = texts(events, "tool.output")
    output = "".join(chunks)
    for secret in fake_secrets(5):
        assert secret.value not in output, secret.kind
    assert output.count(REDACTED) >= 5
    assert sum(p["redactions"] for n, p in events if n == "tool.output") == 5
    assert all(len(c.encode()) <= MAX_CHUNK_BYTES for c in chunks)
    assert abs(len(output) - 2 ** 20) < 2000
    assert complete_of(events)["status"] == "ok"


async def test_load_small_chunks_and_subagents(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("load", {}, None, "s1")
    events = await run_turn(handle, "output_mb=0.25 chunk_kb=16 subagents=3 cpu_s=0.3")
    kinds = [n for n, _ in events]
    assert kinds.count("subagent.start") == kinds.count("subagent.complete") == 3
    for sid in {p["subagent_id"] for n, p in events if n == "subagent.start"}:
        own = [n for n, p in events if n.startswith("subagent.") and p["subagent_id"] == sid]
        assert own[0] == "subagent.start" and own[-1] == "subagent.complete"
        assert "subagent.progress" in own
    chunks = texts(events, "tool.output")
    assert sum(len(c) for c in chunks) == 2 ** 18  # 85.3 KiB per subagent: 5 full chunks and a partial one
    assert len(chunks) == 18 and all(len(c) <= 16 * 1024 for c in chunks)
    assert complete_of(events)["status"] == "ok"


async def test_load_python_turn_is_cancelled_promptly(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("load", {}, None, "s1")
    handle.send("prompt", {"turn_id": "t1", "text": "cpu_s=30 output_mb=1"})
    events = []
    start = None
    worker = psutil.Process(handle.pid)
    async for frame in handle.frames():
        events.append((frame.name, json.loads(frame.body)))
        if frame.name == "turn.start":
            start = sum(worker.cpu_times()[:2])
            handle.send("cancel", {"turn_id": "t1"})
        if frame.name == "turn.complete":
            break
    # CPU seconds spent after the cancel (wall-clock stretches on a loaded machine): far below the 30 s.
    assert start is not None and sum(worker.cpu_times()[:2]) - start < 2
    assert complete_of(events) == {"turn_id": "t1", "status": "interrupted"}
    assert complete_of(await run_turn(handle, "cpu_s=0.01", turn_id="t2"))["status"] == "ok"


async def test_load_regex_holds_the_gil_in_the_worker_not_the_gateway(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("load", {}, None, "s1")
    worker = psutil.Process(handle.pid)
    cpu_before = sum(worker.cpu_times()[:2])
    with LagMonitor() as lag:
        start = time.monotonic()
        events = await run_turn(handle, "gil=regex cpu_s=3", timeout=30)
        elapsed = time.monotonic() - start
    cpu_used = sum(worker.cpu_times()[:2]) - cpu_before
    assert complete_of(events)["status"] == "ok"
    assert cpu_used >= 2.5, cpu_used
    assert elapsed >= 2.5
    assert lag.max_lag < 0.25, lag.max_lag  # the test's own loop kept ticking throughout


async def test_regex_turn_only_notices_cancel_between_calls(supervisor: Supervisor) -> None:
    """While a regex call holds the GIL, the worker's cancel reader cannot run; the cancel takes effect
    when the call returns (the gateway's interrupt grace then decides whether to kill)."""
    handle = await supervisor.acquire("load", {}, None, "s1")
    handle.send("prompt", {"turn_id": "t1", "text": "gil=regex cpu_s=20"})
    events = []
    sent = None
    worker = psutil.Process(handle.pid)
    async for frame in handle.frames():
        events.append((frame.name, json.loads(frame.body)))
        if frame.name == "turn.start":
            await wait_until(lambda: sum(worker.cpu_times()[:2]) > 0.3, 10, "the regex to be running")
            sent = sum(worker.cpu_times()[:2])
            handle.send("cancel", {"turn_id": "t1"})
        if frame.name == "turn.complete":
            break
    assert sent is not None
    # CPU seconds, not wall-clock (a loaded machine stretches the latter): at most the call in progress
    # (about 1-2 CPU-s), far from the 20 CPU-s budget.
    assert sum(worker.cpu_times()[:2]) - sent < 4
    assert complete_of(events)["status"] == "interrupted"


async def test_slow_reader_blocks_the_worker_and_nothing_is_lost() -> None:
    sup = Supervisor(pool_size=0, max_queued_bytes=128 * 1024)
    await sup.start()
    try:
        handle = await sup.acquire("load", {}, None, "s1")
        handle.send("prompt", {"turn_id": "t1", "text": "output_mb=16 chunk_kb=64"})
        worker = psutil.Process(handle.pid)
        await wait_until(lambda: handle._reader.paused, 10, "the reader to pause")
        # Blocked in write(): its CPU time stops growing while nobody reads.
        await wait_until(lambda: worker.status() == psutil.STATUS_SLEEPING, 5, "the worker to block")
        cpu = sum(worker.cpu_times()[:2])
        await asyncio.sleep(0.3)  # proving a negative: it must make no progress meanwhile
        assert sum(worker.cpu_times()[:2]) - cpu < 0.05
        assert handle._reader.queued_bytes < 128 * 1024 + 512 * 1024
        chunks = 0
        async for frame in handle.frames():
            chunks += frame.name == "tool.output"
            if frame.name == "turn.complete":
                assert json.loads(frame.body)["status"] == "ok"
                break
        assert chunks == 16 * 16
    finally:
        await sup.close()


# -- the agent API: cancel hook, snapshot / restore ---------------------------------------------------------
# Agents for these tests live here (the worker imports them as ``test_agents:<Name>``).

class BlockedOnSocket(Agent):
    """A turn blocked in a socket read that never polls ``cancelled``: only its cancel hook can end it."""

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        ours, theirs = socket.socketpair()
        try:
            unregister = turn.on_cancel(lambda: ours.shutdown(socket.SHUT_RDWR))
            turn.delta("blocked")
            data = ours.recv(1)  # nothing is ever sent: returns b"" only once shut down
            unregister()
            return TurnResult("interrupted" if turn.cancelled else "error",
                              error=None if turn.cancelled else f"read returned {data!r}")
        finally:
            ours.close()
            theirs.close()


class TurnCounter(Agent):
    """Counts its turns across workers through snapshot/restore; reports what it saw at start-up."""

    def __init__(self, options: Any, cwd: str) -> None:
        super().__init__(options, cwd)
        self.turns = 0
        self.restored_before_start: bool | None = None
        self.restored = False

    def restore(self, state: Any) -> None:
        if state == "explode":
            raise ValueError("unreadable state")
        self.turns = state["turns"]
        self.restored = True

    def start(self) -> None:
        self.restored_before_start = self.restored

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        self.turns += 1
        turn.delta(json.dumps({"turns": self.turns, "restored_before_start": self.restored_before_start}))
        return None

    def snapshot(self) -> Any:
        if self.options.get("bad_snapshot"):
            return {"not json": object()}
        return {"turns": self.turns}


async def acquire_with_state(sup: Supervisor, agent: str, state: Any, options: dict | None = None) -> Any:
    """A worker whose ``init`` carries ``state`` (the supervisor takes it encoded, as the gateway keeps it)."""
    encoded = None if state is None else json.dumps(state).encode()
    return await sup.acquire(agent, options or {}, None, "s1", state=encoded)


def test_on_cancel_runs_at_once_when_registered_after_the_cancel() -> None:
    handle = TurnHandle("t1", lambda kind, payload: None)
    handle.cancel()
    calls: list[str] = []
    handle.on_cancel(lambda: calls.append("ran"))
    assert calls == ["ran"] and handle.cancelled


def test_cancel_runs_each_callback_once_and_skips_unregistered_ones() -> None:
    handle = TurnHandle("t1", lambda kind, payload: None)
    calls: list[str] = []
    handle.on_cancel(lambda: calls.append("a"))
    unregister = handle.on_cancel(lambda: calls.append("b"))
    handle.on_cancel(lambda: 1 / 0)  # a failing callback must not stop the others
    handle.on_cancel(lambda: calls.append("c"))
    unregister()
    handle.cancel()
    handle.cancel()
    assert calls == ["a", "c"]


async def test_cancel_hook_unblocks_a_turn_stuck_in_a_socket_read(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("test_agents:BlockedOnSocket", {}, None, "s1")
    handle.send("prompt", {"turn_id": "t1", "text": "wait"})
    events = []
    async def collect() -> None:
        async for frame in handle.frames():
            events.append((frame.name, json.loads(frame.body)))
            if frame.name == "message.delta":
                handle.send("cancel", {"turn_id": "t1"})
            if frame.name == "turn.complete":
                return
    await asyncio.wait_for(collect(), 20)
    assert complete_of(events)["status"] == "interrupted"
    assert handle.alive  # the same worker goes on serving


async def test_snapshot_is_sent_before_turn_complete(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("test_agents:TurnCounter", {}, None, "s1")
    frames: list[Frame] = []
    await run_turn(handle, "one", turn_id="t1", on_frame=frames.append)
    names = [(f.kind, f.name) for f in frames]
    assert names[-2:] == [(Kind.CONTROL, Op.STATE), (Kind.EVENT, "turn.complete")]
    assert frames[-2].json() == {"state": {"turns": 1}}
    frames.clear()
    await run_turn(handle, "two", turn_id="t2", on_frame=frames.append)
    assert frames[-2].json() == {"state": {"turns": 2}}


async def test_agents_without_snapshot_send_no_state_frame(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("echo", {}, None, "s1")
    frames: list[Frame] = []
    await run_turn(handle, "hi", on_frame=frames.append)
    assert all(f.kind is Kind.EVENT for f in frames)


async def test_restore_gets_the_state_before_start(supervisor: Supervisor) -> None:
    acquired = await acquire_with_state(supervisor, "test_agents:TurnCounter", {"turns": 41})
    handle = acquired[0] if isinstance(acquired, tuple) else acquired
    if isinstance(acquired, tuple):
        assert (acquired[1].kind, acquired[1].name) == (Kind.CONTROL, Op.READY), acquired[1]
    events = await run_turn(handle, "next")
    assert json.loads(texts(events, "message.delta")[0]) == {"turns": 42, "restored_before_start": True}


async def test_null_state_is_not_restored(supervisor: Supervisor) -> None:
    acquired = await acquire_with_state(supervisor, "test_agents:TurnCounter", None)
    handle = acquired[0] if isinstance(acquired, tuple) else acquired
    events = await run_turn(handle, "first")
    assert json.loads(texts(events, "message.delta")[0]) == {"turns": 1, "restored_before_start": False}


async def test_a_failing_restore_fails_the_start_with_its_message(supervisor: Supervisor) -> None:
    try:
        acquired = await acquire_with_state(supervisor, "test_agents:TurnCounter", "explode")
    except Exception as exc:  # the lead's acquire(state=) raises WorkerStartError
        assert "failed to restore its state" in str(exc) and "unreadable state" in str(exc)
        return
    handle, first = acquired
    assert first.name == Op.INIT_FAILED
    body = first.json()
    assert body["code"] == 5001 and "failed to restore its state: ValueError: unreadable state" in body["message"]
    await handle.stop()


@pytest.mark.parametrize("raw", [b'1,"agent":"shell"', b'{"turns": 1', b"\xff\xfe", b"[" * 200_000],
                         ids=["spliced-keys", "cut-short", "not-utf8", "too-deep"])
async def test_a_saved_state_that_is_not_json_fails_the_start_in_the_worker(supervisor: Supervisor, raw: bytes) -> None:
    """The gateway hands a state on as it kept it (only a broken or hostile worker can have sent one that is
    not JSON); the new worker decodes it and fails its start (5001), where the gateway's loop used to raise
    (a ValueError no caller expected) and where splicing it into the init would have added keys."""
    with pytest.raises(SavedStateError, match="saved state is not JSON"):
        await supervisor.acquire("test_agents:TurnCounter", {}, None, "s1", state=raw)
    handle = await supervisor.acquire("test_agents:TurnCounter", {}, None, "s1")  # the supervisor is fine
    assert json.loads(texts(await run_turn(handle, "first"), "message.delta")[0])["turns"] == 1


async def test_a_large_saved_state_reaches_restore_whole(supervisor: Supervisor) -> None:
    state = {"turns": 41, "pad": "\u00e9" * (2 * 1024 * 1024)}  # 4 MiB of UTF-8: decoded in the worker only
    handle = await supervisor.acquire("test_agents:TurnCounter", {}, None, "s1", state=json.dumps(state, ensure_ascii=False).encode())
    events = await run_turn(handle, "next")
    assert json.loads(texts(events, "message.delta")[0]) == {"turns": 42, "restored_before_start": True}


async def test_a_failing_snapshot_keeps_the_turn_and_says_why(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("test_agents:TurnCounter", {"bad_snapshot": True}, None, "s1")
    frames: list[Frame] = []
    events = await run_turn(handle, "one", on_frame=frames.append)
    done = complete_of(events)
    assert done["status"] == "ok" and "snapshot failed: TypeError" in done["state_error"]
    assert not [f for f in frames if f.kind is Kind.CONTROL]
