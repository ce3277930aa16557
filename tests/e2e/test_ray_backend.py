"""The Ray worker backend, for real: a two-node Ray cluster started by this module (both nodes on this
machine), real gateways joining it as drivers, real workers on both nodes, psutil to prove what ends.

Skipped (with the reason) only when the ``ray`` extra is not installed; ``make setup`` installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import websockets

from support import GatewayProcess, RpcClient, alive, async_wait_for, pgid_members
from workers.backends.ray_env import prepare_ray_environment
from workers.backends.ray_placement import HostLoad, HostState, choose_node, no_room_message

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

_MIB = 1024 * 1024
_NODE = {"num_cpus": 1, "object_store_memory": 80 * _MIB, "include_dashboard": False,
         "node_ip_address": "127.0.0.1"}  # loopback only


# -- placement: pure ------------------------------------------------------------------------------------

def _load(node: str, sessions: int, state: HostState = HostState.READY) -> HostLoad:
    return HostLoad(node, state, sessions)


def test_placement_picks_the_least_loaded_ready_node() -> None:
    hosts = [_load("b", 1), _load("a", 1), _load("c", 0, HostState.STARTING), _load("d", 0, HostState.FAILED)]
    assert choose_node(hosts, 4) == "a"  # tie: lowest id; starting and failed hosts never chosen
    assert choose_node([_load("a", 3), _load("b", 2)], 4) == "b"
    assert choose_node([_load("a", 0), _load("b", 1)], 4, avoid=frozenset({"a"})) == "b"


def test_placement_refuses_full_nodes_and_says_why() -> None:
    hosts = [_load("a", 2), _load("b", 2)]
    assert choose_node(hosts, 2) is None
    message = no_room_message(hosts, 2, 1.5)
    assert "2 node(s)" in message and "at most 2 per node" in message and "ray_sessions_per_node" in message
    assert "none ready" in no_room_message([_load("a", 0, HostState.STARTING)], 2, 1.0)


def test_ray_environment_is_explicit_and_keeps_loopback_clusters_on_loopback() -> None:
    env: dict[str, str] = {}
    prepare_ray_environment("10.0.0.5:6379", env)
    assert env == {"RAY_AUTH_MODE": "disabled"}
    env = {"RAY_AUTH_MODE": "token"}  # the operator's choice wins
    prepare_ray_environment("127.0.0.1:6379", env)
    assert env == {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = {}
    prepare_ray_environment("local", env)
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_the_local_backend_imports_nothing_of_ray() -> None:
    code = ("import sys, gateway.server, gateway.app; from gateway.config import Config; "
            "from workers.backends import create_backend; create_backend(Config()); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- start-up errors: one line, exit 2, nothing of Ray started -------------------------------------------

@pytest.mark.parametrize("address, reason", [("127.0.0.1:1", "unreachable"), ("auto", "refused"),
                                             ("ray://127.0.0.1:10001", "not supported"),
                                             (None, "needs --ray-address")])
def test_a_cluster_that_cannot_be_used_is_a_one_line_error(address: str | None, reason: str) -> None:
    gw = GatewayProcess("--backend", "ray", *(("--ray-address", address) if address else ()))
    with pytest.raises(Exception) as info:
        gw.start(timeout=60)
    gw.stop()
    assert gw.proc is not None and gw.proc.returncode == 2
    errors = [line for line in gw.stderr().splitlines() if line.startswith("worker-gateway: error:")]
    assert len(errors) == 1 and reason in errors[0], gw.stderr()
    assert "Traceback" not in gw.stderr()
    assert info.value is not None


# -- a real cluster ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two Ray nodes on this machine, owned by this test module (its processes end with ``shutdown``)."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_TMPDIR")}
    temp_dir = tempfile.mkdtemp(prefix="wg-ray-t-", dir="/tmp")  # short: Ray's socket paths live below it
    os.makedirs(os.path.join(temp_dir, "ray"))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_TMPDIR"] = temp_dir  # Cluster.add_node writes its address file there, not /tmp/ray
    made = Cluster(initialize_head=True, connect=False, head_node_args={**_NODE, "temp_dir": temp_dir})
    try:
        made.add_node(**_NODE)
        made.wait_for_nodes()
        yield made
    finally:
        made.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_gateway(cluster: Cluster, *args: str) -> GatewayProcess:
    return GatewayProcess("--backend", "ray", "--ray-address", cluster.address, "--pool-size", "1",
                          "--no-state", *args, env={"RAY_AUTH_MODE": "disabled"}).start(timeout=120)


@pytest.fixture
def ray_gateway(cluster: Cluster) -> Iterator[Any]:
    started: list[GatewayProcess] = []

    def make(*args: str) -> GatewayProcess:
        gw = _ray_gateway(cluster, *args)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


async def _group_gone(pid: int, timeout: float = 15.0) -> None:
    await async_wait_for(lambda: not pgid_members(pid), timeout, what=f"process group {pid} gone")


def _wait_channels(pid: int) -> list[str]:
    """Where each thread of ``pid`` sleeps in the kernel (``anon_pipe_write``: blocked writing a pipe)."""
    channels = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/wchan") as f:
                channels.append(f.read().strip())
        except OSError:
            pass
    return channels


def _gapless(events: list[dict]) -> bool:
    numbers = [e["seq"] for e in events]
    return numbers == list(range(1, len(numbers) + 1))


async def test_sessions_on_ray_stream_resume_interrupt_and_close(cluster: Cluster, ray_gateway: Any) -> None:
    gw = ray_gateway("--interrupt-grace-s", "1")
    head, worker_node = cluster.head_node.node_id, next(iter(cluster.worker_nodes)).node_id
    async with RpcClient.connect(gw.url()) as client:
        created = [await client.call("session.create", agent="load") for _ in range(2)]
        assert {c["node"] for c in created} == {head, worker_node}  # least-loaded placement spreads them
        listed = {s["session_id"]: s["node"] for s in (await client.call("session.active_list"))["sessions"]}
        assert listed == {c["session_id"]: c["node"] for c in created}
        sid = created[0]["session_id"]

        # 10 MiB through a host actor's streaming generator, in order, nothing lost.
        done = await client.run_turn(sid, "output_mb=10", timeout=120)
        assert done["status"] == "ok"
        text = sum(len(e["payload"].get("text", "")) for e in client.session_events(sid, "tool.output"))
        assert text == 10 * _MIB
        assert _gapless(client.session_events(sid))

        # A GIL-holding turn is interrupted; the host kills the worker's group if it does not stop in time.
        other = created[1]
        await client.call("prompt.submit", session_id=other["session_id"], text="cpu_s=30 gil=regex")
        await client.wait_event(other["session_id"], "turn.start")
        assert await client.call("session.interrupt", session_id=other["session_id"]) == {"status": "interrupted"}
        assert (await client.run_turn(other["session_id"], "cpu_s=0"))["status"] == "ok"
        first = client.session_events(other["session_id"], "turn.complete")[0]["payload"]
        assert first["status"] == "interrupted"
        for exited in client.session_events(other["session_id"], "worker.exited"):
            assert exited["payload"]["expected"] is True
            await _group_gone(exited["payload"]["pid"])

        # Disconnect mid-stream, resume on a new connection: gapless.
        await client.call("prompt.submit", session_id=sid, text="output_mb=2 chunk_kb=1")
        await client.wait(lambda: len(client.session_events(sid)) >= len(client.session_events(sid)) + 0, 1)
        mark = len(client.session_events(sid))
        await client.wait(lambda: len(client.session_events(sid)) >= mark + 300, 60)
        before = list(client.session_events(sid))
    async with RpcClient.connect(gw.url()) as second:
        resumed = await second.call("session.resume", session_id=sid, after_seq=before[-1]["seq"])
        assert resumed["truncated"] is False
        await second.wait(lambda: len([e for e in second.session_events(sid) if e["type"] == "turn.complete"]) >= 1, 120)
        union = before + second.session_events(sid)
        assert _gapless(union) and union[-1]["payload"]["status"] == "ok"

        # Close: every worker group on both nodes ends.
        pids = [c["worker_pid"] for c in created]
        pids += [e["payload"]["pid"] for s in created for e in second.session_events(s["session_id"], "worker.exited")]
        for c in created:
            await second.call("session.close", session_id=c["session_id"])
        current = [p for p in pids if pgid_members(p)]
        for pid in current:
            await _group_gone(pid)
        assert (await second.call("session.active_list"))["sessions"] == []


async def test_unplaceable_session_fails_with_5001(cluster: Cluster, ray_gateway: Any) -> None:
    gw = ray_gateway("--ray-sessions-per-node", "1", "--ray-placement-timeout-s", "0.5")
    async with RpcClient.connect(gw.url()) as client:
        await client.call("session.create")
        await client.call("session.create")
        started = time.monotonic()
        response = await client.request("session.create", {}, timeout=30)
        assert response["error"]["code"] == 5001, response
        assert "no Ray node has room" in response["error"]["message"]
        assert time.monotonic() - started < 20  # bounded by the deadline, never a hang
        # /metrics: workers per node, the placement failure, the backend's acquire latency.
        import urllib.request

        request = urllib.request.Request(gw.http("/metrics"), headers={"Authorization": f"Bearer {gw.token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read().decode()
        per_node = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("wg_backend_workers{")]
        assert sum(per_node) == 2 and len(per_node) == 2, text
        assert any(line.startswith("wg_backend_placement_failures ") and float(line.split()[-1]) >= 1
                   for line in text.splitlines())
        assert 'wg_backend_acquire_seconds{stat="p50"}' in text


async def test_a_client_that_stops_reading_blocks_the_worker_on_its_node(cluster: Cluster, ray_gateway: Any) -> None:
    """Backpressure end to end across Ray: socket -> session -> generator -> host -> pipe -> worker."""
    gw = ray_gateway()
    gateway_proc = psutil.Process(gw.pid)
    async with websockets.connect(gw.url(), max_size=None, max_queue=1) as ws:
        await ws.recv()
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.create", "params": {"agent": "load"}}))
        created = json.loads(await ws.recv())["result"]
        sid, worker = created["session_id"], psutil.Process(created["worker_pid"])
        rss_before = gateway_proc.memory_info().rss
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "prompt.submit",
                                  "params": {"session_id": sid, "text": "output_mb=64 chunk_kb=64"}}))
        # Not reading from here on: the worker must end up blocked in a write to its pipe, mid-turn.
        samples: list[float] = []

        def worker_blocked() -> bool:
            times = worker.cpu_times()
            samples.append(times.user + times.system)
            if len(samples) < 3 or samples[-1] != samples[-3]:
                return False
            waits = _wait_channels(worker.pid)
            return any("pipe_w" in w for w in waits) or all(w in ("", "0") for w in waits)  # "0": hidden

        await async_wait_for(worker_blocked, 60, interval=0.25, what="the worker blocked by backpressure")
        assert gateway_proc.memory_info().rss - rss_before < 100 * _MIB
        seqs: list[int] = []
        total = 0
        while True:
            params = json.loads(await asyncio.wait_for(ws.recv(), 60)).get("params") or {}
            if params.get("session_id") == sid and params.get("seq"):
                seqs.append(params["seq"])
                if params["type"] == "tool.output":
                    total += len(params["payload"]["text"])
                elif params["type"] == "turn.complete":
                    assert params["payload"]["status"] == "ok"
                    break
        assert seqs == list(range(1, len(seqs) + 1)) and total == 64 * _MIB
        assert gateway_proc.memory_info().rss - rss_before < 100 * _MIB


async def test_gateway_death_ends_its_workers_on_every_node(cluster: Cluster, ray_gateway: Any) -> None:
    gw = ray_gateway()
    async with RpcClient.connect(gw.url()) as client:
        created = [await client.call("session.create", agent="load") for _ in range(2)]
        assert len({c["node"] for c in created}) == 2
        assert (await client.call("slash.exec", session_id=created[1]["session_id"], command="/help", timeout=60))["ok"]
        actor = _host_actor_of(created[1]["worker_pid"])
        (slash_keeper,) = await async_wait_for(lambda: _slash_keepers_under(actor), 10, what="the slash keeper")
        for c in created:
            await client.call("prompt.submit", session_id=c["session_id"], text="cpu_s=60")
            await client.wait_event(c["session_id"], "turn.start")
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGKILL)
    for pid in [c["worker_pid"] for c in created] + [slash_keeper]:  # the slash worker on its node too
        await _group_gone(pid, timeout=20.0)


def test_frame_batches_yields_each_generator_items_frames_until_eof(cluster: Cluster, tmp_path: Any) -> None:
    """RayWorker.frame_batches() directly (tests/e2e/ray_batches_probe.py, its own Ray driver): each item
    of the host's stream is one non-empty list of decoded frames, in order, nothing lost, and the iterator
    ends at the worker's EOF.  The gateway's registry still consumes frames(), covered above."""
    probe = os.path.join(os.path.dirname(__file__), "ray_batches_probe.py")
    out = subprocess.run([sys.executable, probe, cluster.address, str(tmp_path)], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["node"] in {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
    assert seen["kinds_ok"] and seen["sizes"] and all(n > 0 for n in seen["sizes"])
    assert seen["text"] == 2 * _MIB  # 2048 1 KiB events, every one
    assert len(seen["sizes"]) < sum(seen["sizes"])  # coalesced: several frames per generator item
    assert seen["after_stop"] == [] and seen["status_pid"] == seen["pid"]
    assert not pgid_members(seen["pid"])


def _host_actor_of(pid: int) -> psutil.Process:
    """The host actor process (``ray::WorkerHost``) that ``pid`` descends from on its node."""
    for proc in psutil.Process(pid).parents():
        if _is_host_actor(proc):
            return proc
    raise AssertionError(f"process {pid} does not descend from a Ray host actor")


def _slash_keepers_under(actor: psutil.Process) -> list[int]:
    """The slash workers' keepers (their group leaders) among the host actor's descendants."""
    keepers = []
    for proc in actor.children(recursive=True):
        try:
            if any("slash_worker.py" in part for part in proc.cmdline()) and os.getpgid(proc.pid) == proc.pid:
                keepers.append(proc.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return keepers


async def test_slash_commands_run_on_the_sessions_node_survive_a_dead_host_and_end_with_the_session(
        cluster: Cluster, ray_gateway: Any, tmp_path: Any) -> None:
    gw = ray_gateway("--slash-timeout-s", "2")
    (tmp_path / "evil.txt").write_text("a" * 40 + "b\n")  # catastrophic for (a+)+$: holds the GIL for minutes
    async with RpcClient.connect(gw.url()) as client:
        created = [await client.call("session.create", agent="load", cwd=str(tmp_path)) for _ in range(2)]
        assert len({c["node"] for c in created}) == 2
        actors = [_host_actor_of(c["worker_pid"]) for c in created]
        assert actors[0].pid != actors[1].pid
        gateway_tree = {p.pid for p in psutil.Process(gw.pid).children(recursive=True)}
        keepers: list[int] = []
        for c, actor in zip(created, actors):
            assert _slash_keepers_under(actor) == []
            reply = await client.call("slash.exec", session_id=c["session_id"], command="/status", timeout=60)
            assert reply["ok"] is True and f"worker pid: {c['worker_pid']}" in reply["output"], reply
            # Its keeper is a child of the host actor on the session's node, never of the gateway.
            under = await async_wait_for(lambda: _slash_keepers_under(actor), 10, what="the slash keeper")
            assert len(under) == 1 and psutil.Process(under[0]).ppid() == actor.pid
            assert under[0] not in gateway_tree
            keepers.append(under[0])
        sid = created[0]["session_id"]
        assert (await client.call("slash.exec", session_id=sid, command="/help"))["ok"]
        assert _slash_keepers_under(actors[0]) == keepers[:1]  # persistent: one per session

        # A runaway command times out on its node: its worker's group is killed there (while the
        # gateway's read of its frames is pending on the host) and the next command gets a fresh one.
        other = created[1]["session_id"]
        slow = await client.call("slash.exec", session_id=other, command="/grep '(a+)+$' evil.txt", timeout=60)
        assert slow["ok"] is False and "timed out after 2 s" in slow["output"], slow
        await _group_gone(keepers[1])
        assert (await client.call("slash.exec", session_id=other, command="/help", timeout=60))["ok"]
        keepers[1:] = await async_wait_for(lambda: _slash_keepers_under(actors[1]), 10, what="a fresh slash keeper")
        assert len(keepers) == 2

        # The first session's host actor dies: its slash worker ends with it (the keeper watches the
        # actor), the next command fails cleanly, and the one after runs on a live host actor.
        os.kill(actors[0].pid, signal.SIGKILL)  # the host actor this test's gateway started
        await _group_gone(keepers[0])
        failed = await client.call("slash.exec", session_id=sid, command="/help", timeout=60)
        assert failed["ok"] is False and "the slash worker died while running /help" in failed["output"], failed
        assert "Ray node" in failed["output"] and "next command starts a fresh one" in failed["output"]
        again = await client.call("slash.exec", session_id=sid, command="/help", timeout=60)
        assert again["ok"] is True, again
        live = [a for a in _host_actors(cluster) if a.pid != actors[0].pid]
        restarted = [k for a in live for k in _slash_keepers_under(a) if k not in keepers]
        assert len(restarted) == 1  # on the other node's host, or the dead one's replacement
        keepers += restarted
        assert [r["payload"]["ok"] for r in client.session_events(sid, "slash.result")] == [True, True, False, True]

        # Close: every slash process, on both nodes, is gone.
        members = [psutil.Process(p) for k in keepers for p in pgid_members(k)]
        assert members
        for c in created:
            await client.call("session.close", session_id=c["session_id"])
        for keeper in keepers:
            await _group_gone(keeper)
        await async_wait_for(lambda: not alive(members),
                             15, what="every slash process gone")


def _host_actors(cluster: Cluster) -> list[psutil.Process]:
    """The host actor processes running on this test's cluster (children of its raylets)."""
    actors = []
    for node in [cluster.head_node, *cluster.worker_nodes]:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        actors += [p for p in raylet.children() if _is_host_actor(p)]
    return actors


def _is_host_actor(proc: psutil.Process) -> bool:
    try:
        return any(text.startswith("ray::WorkerHost") for text in (proc.name(), *proc.cmdline()[:1]))
    except psutil.Error:
        return False


async def test_node_failure_mid_turn_recovers_on_the_other_node(cluster: Cluster, ray_gateway: Any) -> None:
    """Runs last: it removes the cluster's second node."""
    gw = ray_gateway()
    worker_node = next(iter(cluster.worker_nodes))
    async with RpcClient.connect(gw.url()) as client:
        created = [await client.call("session.create", agent="load") for _ in range(2)]
        victim = next(c for c in created if c["node"] == worker_node.node_id)
        sid = victim["session_id"]
        await client.call("prompt.submit", session_id=sid, text="cpu_s=60")
        await client.wait_event(sid, "turn.start")
        await asyncio.to_thread(cluster.remove_node, worker_node)
        exited = (await client.wait_event(sid, "worker.exited", timeout=60))[0]["payload"]
        assert exited["expected"] is False
        complete = (await client.wait_event(sid, "turn.complete", timeout=30))[0]["payload"]
        assert complete["status"] == "error"
        await _group_gone(victim["worker_pid"])
        assert (await client.run_turn(sid, "output_mb=1", timeout=120))["status"] == "ok"
        nodes = {s["session_id"]: s.get("node") for s in (await client.call("session.active_list"))["sessions"]}
        assert nodes[sid] == cluster.head_node.node_id
        assert _gapless(client.session_events(sid))
