"""Through a real gateway: without a cgroup a session's scheduling group weighs by how many sessions run
a turn (workers/cpu_weight.py), from the prompt that starts a turn to the turn.complete that ends it; by
default the workers run in the gateway's own worker cgroup (workers/cpu_cgroup.py), gone with it."""

from __future__ import annotations

import os

import pytest
from support import RpcClient, async_wait_for, autogroup_nice, cpu_cgroup_of

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="this kernel has no autogroups"),
]


async def test_running_turns_share_the_weight_and_idle_sessions_drop_to_worker_nice(gateway_factory) -> None:
    gw = gateway_factory("--worker-cpu-cgroup", "off")
    async with RpcClient.connect(gw.url()) as client:
        first = await client.call("session.create", agent="shell")
        second = await client.call("session.create", agent="shell")
        pids = [first["worker_pid"], second["worker_pid"]]
        nices = lambda: [autogroup_nice(pid) for pid in pids]  # noqa: E731
        await async_wait_for(lambda: nices() == [19, 19], 20, what="idle sessions at nice 19")

        await client.call("prompt.submit", session_id=first["session_id"], text="sleep 60")
        await async_wait_for(lambda: nices() == [7, 19], 20, what="one turn alone at nice 7")
        await client.call("prompt.submit", session_id=second["session_id"], text="sleep 60")
        await async_wait_for(lambda: nices() == [10, 10], 20, what="two turns at nice 10 each")

        interrupted = await client.call("session.interrupt", session_id=first["session_id"])
        assert interrupted["status"] == "interrupted"
        await async_wait_for(lambda: nices() == [19, 7], 20, what="the turn left alone back at 7")
        await client.call("session.interrupt", session_id=second["session_id"])
        await async_wait_for(lambda: nices() == [19, 19], 20, what="no turn: both at 19")
        for created in (first, second):
            await client.call("session.close", session_id=created["session_id"])


async def test_share_zero_keeps_every_session_at_worker_nice(gateway_factory) -> None:
    gw = gateway_factory("--worker-cpu-share", "0", "--worker-nice", "7", "--worker-cpu-cgroup", "off")
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="shell")
        pid = created["worker_pid"]
        await client.call("prompt.submit", session_id=created["session_id"], text="sleep 60")
        await client.wait_event(created["session_id"], "turn.start")
        await async_wait_for(lambda: autogroup_nice(pid) == 7, 20, what="the running turn at nice 7")
        await client.call("session.close", session_id=created["session_id"])


async def test_by_default_workers_run_in_the_gateways_worker_cgroup_which_goes_with_it(gateway_factory) -> None:
    from workers.cpu_cgroup import WorkerCgroup

    probe = WorkerCgroup.create(0.25)  # as the gateway will try
    if probe is None:
        pytest.skip("no cpu cgroup hierarchy this process may write to")
    probe.remove()
    gw = gateway_factory()
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="shell")
        cgroup = cpu_cgroup_of(created["worker_pid"])
        assert cgroup is not None and cgroup.parent == cpu_cgroup_of(gw.pid)
        assert cgroup.name.startswith(f"worker-gateway-{gw.pid}.")
        await client.call("session.close", session_id=created["session_id"])
    assert gw.stop() == 0
    assert not cgroup.exists()
