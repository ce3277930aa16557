"""Through a real gateway: a session's scheduling group weighs by how many sessions run a turn
(workers/cpu_weight.py), from the prompt that starts a turn to the turn.complete that ends it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import RpcClient, async_wait_for

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="this kernel has no autogroups"),
]


def autogroup_nice(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (FileNotFoundError, ProcessLookupError):
        return None


async def test_running_turns_share_the_weight_and_idle_sessions_drop_to_worker_nice(rpc_connect) -> None:
    async with rpc_connect() as client:
        first = await client.call("session.create", agent="shell")
        second = await client.call("session.create", agent="shell")
        pids = [first["worker_pid"], second["worker_pid"]]
        nices = lambda: [autogroup_nice(pid) for pid in pids]  # noqa: E731
        await async_wait_for(lambda: nices() == [19, 19], 20, what="idle sessions at nice 19")

        await client.call("prompt.submit", session_id=first["session_id"], text="sleep 60")
        await async_wait_for(lambda: nices() == [0, 19], 20, what="one turn alone at nice 0")
        await client.call("prompt.submit", session_id=second["session_id"], text="sleep 60")
        await async_wait_for(lambda: nices() == [4, 4], 20, what="two turns at nice 4 each")

        interrupted = await client.call("session.interrupt", session_id=first["session_id"])
        assert interrupted["status"] == "interrupted"
        await async_wait_for(lambda: nices() == [19, 0], 20, what="the turn left alone back at 0")
        await client.call("session.interrupt", session_id=second["session_id"])
        await async_wait_for(lambda: nices() == [19, 19], 20, what="no turn: both at 19")
        for created in (first, second):
            await client.call("session.close", session_id=created["session_id"])


async def test_share_zero_keeps_every_session_at_worker_nice(gateway_factory) -> None:
    gw = gateway_factory("--worker-cpu-share", "0", "--worker-nice", "7")
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="shell")
        pid = created["worker_pid"]
        await client.call("prompt.submit", session_id=created["session_id"], text="sleep 60")
        await client.wait_event(created["session_id"], "turn.start")
        await async_wait_for(lambda: autogroup_nice(pid) == 7, 20, what="the running turn at nice 7")
        await client.call("session.close", session_id=created["session_id"])
