"""The Ray worker backend: sessions' agent workers placed on a Ray cluster, the gateway as a Ray driver.

Shape (issue 17, measured there): one *host actor* per node (:class:`workers.backends.ray_host.WorkerHost`)
runs the ordinary local supervisor, so a worker is still a forked child with its own process group and
watchdog, handed out in milliseconds; one streaming generator per worker life carries its raw frames in
batches, **always** with generator backpressure, so a slow client still ends up blocking the worker's pipe;
control frames and stops are actor method calls, done inside the host.  ``ray.kill`` and a new host are
only for a host that stops answering.  A session's slash worker runs on its node too, started by the same
host actor (:mod:`workers.backends.ray_slash`).

Importing this module imports Ray: :func:`workers.backends.create_backend` does it only for
``--backend ray``.  Never Ray Client (``ray://``: no streaming generators), never ``address="auto"``,
never the Ray CLI's stop command (it ends every Ray process on the machine).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import ray
from ray.exceptions import ActorDiedError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.agents import registry
from workers.backends.ray_env import is_loopback, prepare_ray_environment
from workers.backends.ray_errors import BackendUnavailable
from workers.backends.ray_host import WorkerHost, pid_space
from workers.backends.ray_placement import HostLoad, HostState, choose_node, no_room_message
from workers.backends.ray_slash import RaySlashWorker
from workers.channel import ChannelError, Frame, FrameDecoder
from workers.supervisor import ExitStatus, UnknownAgentError, WorkerStartError

logger = logging.getLogger("worker_gateway.ray")

LOCAL = "local"
#: Generator items a worker's stream may run ahead of the gateway (each up to ray_host.BATCH_BYTES).
BACKPRESSURE_OBJECTS = 4
#: Heartbeat period, and how long a host may take to answer one before it is replaced.
_PING_PERIOD_S = 0.5
_HOST_TIMEOUT_S = 10.0
#: A host whose gateway has been silent this long ends its workers (the backstop behind Ray's own
#: cleanup of a dead driver's actors and the same-machine pid watch).
_ORPHAN_TIMEOUT_S = 15.0
_NODE_REFRESH_S = 2.0
_HOST_START_TIMEOUT_S = 60.0
#: Smallest object store Ray accepts is 75 MiB; a private cluster needs little more (batches are small).
_LOCAL_OBJECT_STORE_BYTES = 96 * 1024 * 1024


@dataclass
class _Host:
    node_id: str
    actor: Any
    state: HostState = HostState.STARTING
    sessions: int = 0
    workers: int = 0
    pool_ready: int = 0
    started: asyncio.Future[None] | None = None

    def load(self) -> HostLoad:
        return HostLoad(self.node_id, self.state, self.sessions)


@dataclass
class _Counters:
    placement_failures: int = 0
    acquire_seconds: list[float] = field(default_factory=list)  # the last few, for /metrics and the bench


class RayWorker:
    """One worker life on a host actor, behind the :class:`workers.backends.Worker` surface."""

    def __init__(self, backend: RayBackend, host: _Host, worker_id: str, pid: int, agent: str) -> None:
        self._backend = backend
        self._host = host
        self.worker_id = worker_id
        self._pid = pid
        self.agent = agent
        self._frames: Any = None
        self._batches: Any = None
        self._stopping: asyncio.Task[ExitStatus] | None = None
        self._ended = asyncio.Event()

    def __repr__(self) -> str:
        return f"<RayWorker {self.worker_id[:8]} pid={self._pid} node={self.node[:12]}>"

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def node(self) -> str:
        """The Ray node id the worker runs on (named in session.create and session.active_list)."""
        return self._host.node_id

    def send(self, op: str, body: dict[str, Any] | None = None) -> None:
        if self._stopping is not None or self._host.state is HostState.FAILED:
            return
        self._host.actor.send.remote(self.worker_id, str(op), body)  # ordered per caller; result unused

    def turn_running(self, running: bool) -> None:
        """Not passed on: a Ray node's supervisor keeps its sessions' groups at ``worker_nice`` (its own
        nodes' loads are not the gateway's to weigh)."""

    def frames(self) -> Any:
        """The worker's frames one by one (the same stream as :meth:`frame_batches`: use one of them)."""
        if self._frames is None:
            self._frames = self._flatten()
        return self._frames

    def frame_batches(self) -> Any:
        """The worker's frames as the lists decoded from each generator item (one batch of up to
        ``ray_host.BATCH_BYTES``), until EOF; same EOF and error semantics as :meth:`frames`."""
        if self._batches is None:
            self._batches = self._iterate()
        return self._batches

    async def _flatten(self) -> Any:
        async for batch in self.frame_batches():
            for frame in batch:
                yield frame

    async def _iterate(self) -> Any:
        stream = self._host.actor.stream.options(_generator_backpressure_num_objects=BACKPRESSURE_OBJECTS).remote(
            self.worker_id
        )
        decoder = FrameDecoder()
        try:
            async for ref in stream:
                item = await ref
                if isinstance(item, str):
                    raise ChannelError(item)
                frames: list[Frame] = decoder.feed(item)
                if frames:
                    yield frames
        except RayError as exc:  # the host (or its node) died: EOF for the session, a death to report
            logger.warning(
                "worker %s on node %s: stream lost: %s", self.worker_id[:8], self.node[:12], type(exc).__name__
            )
            self._backend._host_suspect(self._host)
            return
        finally:
            self._ended.set()
        decoder.eof()

    async def stop(self) -> ExitStatus:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(), name=f"stop-{self.worker_id[:8]}")
        return await asyncio.shield(self._stopping)

    async def wait(self) -> ExitStatus:
        await self._ended.wait()
        return await self.stop()

    async def _stop(self) -> ExitStatus:
        status = ExitStatus(self._pid, None, None)
        try:
            if self._host.state is not HostState.FAILED:
                ref = self._host.actor.stop_worker.remote(self.worker_id)
                result = await asyncio.wait_for(
                    asyncio.wrap_future(ref.future()), self._backend.kill_grace_s + _HOST_TIMEOUT_S
                )
                if result is not None:
                    status = ExitStatus(*result)
        except TimeoutError:
            logger.warning("host on node %s did not stop worker %s: replacing it", self.node[:12], self.worker_id[:8])
            self._backend._host_failed(self._host, "stop timed out")
        except RayError:
            self._backend._host_suspect(self._host)
        finally:
            self._ended.set()
            self._backend._released(self)
        return status


class RayBackend:
    """Places workers on the nodes of a Ray cluster; see the module docstring."""

    def __init__(
        self,
        *,
        address: str | None,
        sessions_per_node: int,
        placement_timeout_s: float,
        supervisor_options: dict[str, Any],
        start_timeout_s: float,
        kill_grace_s: float,
    ) -> None:
        self.address = address
        self.sessions_per_node = sessions_per_node
        self.placement_timeout_s = placement_timeout_s
        self.start_timeout_s = start_timeout_s
        self.kill_grace_s = kill_grace_s
        self._supervisor_options = supervisor_options
        self._hosts: dict[str, _Host] = {}
        self._workers: set[RayWorker] = set()
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._entry_points: list[str] = []
        self._temp_dir: str | None = None
        self._owned_pids: list[int] = []
        self._started = False
        self._closed = False
        self.counters = _Counters()

    @classmethod
    def from_config(cls, config: Any) -> RayBackend:
        options = {
            "pool_size": config.pool_size,
            "kill_grace_s": config.kill_grace_s,
            "nice": config.worker_nice,
            "start_timeout_s": config.worker_start_timeout_s,
            "watchdog_poll_s": config.watchdog_poll_s,
            "scrub_secrets": [config.token] if getattr(config, "token", None) else [],
            # The host actor relays its workers' pipes on its own loop: the same budget and CPU policy.
            "read_budget_bytes": getattr(config, "relay_read_budget_bytes", None),
            "sched": getattr(config, "worker_sched", "normal"),
        }
        return cls(
            address=config.ray_address,
            sessions_per_node=config.ray_sessions_per_node,
            placement_timeout_s=config.ray_placement_timeout_s,
            supervisor_options=options,
            start_timeout_s=config.worker_start_timeout_s,
            kill_grace_s=config.kill_grace_s,
        )

    # -- the WorkerBackend surface ----------------------------------------------------------------------

    @property
    def live_workers(self) -> int:
        return len(self._workers)

    @property
    def pool_ready(self) -> int:
        return sum(h.pool_ready for h in self._hosts.values() if h.state is HostState.READY)

    def metrics_snapshot(self) -> dict[str, Any]:
        """What ``/metrics`` shows of the backend: workers per node, placement failures, acquire latency."""
        samples = sorted(self.counters.acquire_seconds)

        def pick(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else 0.0

        return {
            "workers_per_node": self.workers_per_node(),
            "placement_failures": self.counters.placement_failures,
            "acquire_seconds": {"p50": pick(0.5), "p99": pick(0.99)},
        }

    def workers_per_node(self) -> dict[str, int]:
        """Handed-out workers per ready node (for metrics and the dashboard)."""
        return {h.node_id: h.sessions for h in self._hosts.values() if h.state is not HostState.FAILED}

    def known_agents(self) -> list[str]:
        names = list(registry.BUILTIN_AGENTS)
        return names + [n for n in self._entry_points if n not in registry.BUILTIN_AGENTS]

    async def start(self) -> None:
        """Join (or start) the cluster as a driver and start a host on every live node.  Raises
        :class:`BackendUnavailable` with a one-line reason when that cannot be done."""
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        self._entry_points = await asyncio.to_thread(registry.entry_point_names)
        self._connect()
        self._refresh_nodes(ray.nodes())
        hosts = [h.started for h in self._hosts.values() if h.started is not None]
        if not hosts:
            raise BackendUnavailable(f"the Ray cluster at {self.address} has no live node")
        await asyncio.wait(hosts, timeout=_HOST_START_TIMEOUT_S)
        if not any(h.state is HostState.READY for h in self._hosts.values()):
            raise BackendUnavailable(
                f"no worker host became ready on the Ray cluster at {self.address} within "
                f"{_HOST_START_TIMEOUT_S:g} s (is worker-gateway installed on its nodes?)"
            )
        self._spawn(self._heartbeat(), "ray-heartbeat")

    async def acquire(
        self,
        agent: str,
        options: dict[str, Any],
        cwd: str | None,
        session_id: str | None = None,
        state: bytes | None = None,
    ) -> RayWorker:
        if self._closed or not self._started:
            raise WorkerStartError("the Ray worker backend is not running")
        try:
            registry.check_name(agent, self._entry_points)
        except registry.UnknownAgent as exc:
            raise UnknownAgentError(str(exc)) from None
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self.placement_timeout_s
        avoid: set[str] = set()
        while True:
            node_id = choose_node((h.load() for h in self._hosts.values()), self.sessions_per_node, frozenset(avoid))
            if node_id is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.counters.placement_failures += 1
                    raise WorkerStartError(
                        no_room_message(
                            (h.load() for h in self._hosts.values()), self.sessions_per_node, self.placement_timeout_s
                        )
                    )
                self._room.clear()
                try:
                    await asyncio.wait_for(self._room.wait(), min(remaining, _NODE_REFRESH_S))
                except TimeoutError:
                    avoid.clear()  # a failed node may have been replaced meanwhile
                continue
            host = self._hosts[node_id]
            host.sessions += 1
            try:
                result = await self._acquire_on(host, agent, options, cwd, session_id, state)
            except RayError as exc:
                host.sessions -= 1
                logger.warning("node %s failed an acquisition (%s): trying another", node_id[:12], type(exc).__name__)
                self._host_suspect(host)
                avoid.add(node_id)
                continue
            except BaseException:
                host.sessions -= 1
                self._room.set()
                raise
            if not result["ok"]:
                host.sessions -= 1
                self._room.set()
                raise WorkerStartError.from_body(result)
            worker = RayWorker(self, host, result["worker_id"], result["pid"], agent)
            self._workers.add(worker)
            self._observe(loop.time() - began)
            return worker

    async def start_slash(self, cwd: str, node: str | None = None) -> RaySlashWorker:
        """A session's slash worker on ``node`` (its agent worker's) when that host is ready, else on the
        node placement picks (slash workers do not count against ``ray_sessions_per_node``: their session
        already does).  Raises ``OSError`` with the reason when no host can start it."""
        if self._closed or not self._started:
            raise OSError("the Ray worker backend is not running")
        avoid: set[str] = set()
        while True:  # a host found dead here is skipped: the command starts on a live node if there is one
            host = self._hosts.get(node) if node and node not in avoid else None
            if host is None or host.state is not HostState.READY:
                chosen = choose_node((h.load() for h in self._hosts.values()), sys.maxsize, frozenset(avoid))
                if chosen is None:
                    raise OSError("no Ray node is ready to run the slash worker")
                host = self._hosts[chosen]
            options = self._supervisor_options
            ref = host.actor.slash_start.remote(
                cwd, options["watchdog_poll_s"], options["nice"], options["kill_grace_s"]
            )
            try:
                async with asyncio.timeout(self.start_timeout_s + _HOST_TIMEOUT_S):  # keeps a cancel
                    result = await asyncio.wrap_future(ref.future())
            except TimeoutError:
                self._host_failed(host, "slash worker start timed out")
                raise OSError(
                    f"the host actor on Ray node {host.node_id[:12]} did not start the slash worker"
                ) from None
            except RayError as exc:
                self._host_gone_or_suspect(host, exc)
                logger.warning(
                    "node %s failed a slash start (%s): trying another", host.node_id[:12], type(exc).__name__
                )
                avoid.add(host.node_id)
                continue
            if not result["ok"]:
                raise OSError(result["message"])
            return RaySlashWorker(self, host, result["slash_id"], result["pid"])

    async def close(self) -> None:
        """Stop every worker and host, leave the cluster, and end a private cluster's processes by pid."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in list(self._workers)), return_exceptions=True)
        closes = [
            asyncio.wrap_future(h.actor.close.remote().future())
            for h in self._hosts.values()
            if h.state is not HostState.FAILED
        ]
        if closes:
            await asyncio.wait(closes, timeout=self.kill_grace_s + 5.0)
        for host in self._hosts.values():
            _kill_actor(host.actor)
        self._hosts.clear()
        if ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)
        await asyncio.to_thread(self._end_owned_cluster)

    # -- cluster connection -----------------------------------------------------------------------------

    def _connect(self) -> None:
        prepare_ray_environment(self.address)  # already done before Ray's import by create_backend
        common: dict[str, Any] = {
            "namespace": "worker-gateway",
            "log_to_driver": False,
            "include_dashboard": False,
            "configure_logging": False,
        }
        if not self.address:
            raise BackendUnavailable(
                "--backend ray needs --ray-address: a cluster's GCS address "
                "(host:port) or 'local' for a private cluster"
            )
        if self.address.startswith("ray://"):
            raise BackendUnavailable(
                "Ray Client addresses (ray://) are not supported: run the gateway on a "
                "Ray node and give the GCS address (host:port)"
            )
        if self.address == "auto":
            raise BackendUnavailable(
                "--ray-address auto is refused (it may attach to another job's cluster): give host:port or 'local'"
            )
        if self.address == LOCAL:
            self._temp_dir = tempfile.mkdtemp(prefix="wg-ray-", dir="/tmp")  # short: Ray's socket paths
            before = {p.pid for p in psutil.Process().children(recursive=True)}
            try:
                ray.init(
                    address="local",
                    _temp_dir=self._temp_dir,
                    num_cpus=os.cpu_count() or 1,
                    _node_ip_address="127.0.0.1",  # a private cluster listens on loopback only
                    object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
                    **common,
                )
            except Exception as exc:
                self._end_owned_cluster()
                raise BackendUnavailable(f"could not start a local Ray cluster: {_one_line(exc)}") from None
            self._owned_pids = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
            return
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3.0):
                pass
        except (OSError, ValueError) as exc:
            raise BackendUnavailable(f"the Ray cluster at {self.address} is unreachable: {_one_line(exc)}") from None
        try:
            if is_loopback(host):  # a cluster on loopback: this driver's node is the loopback one too
                common["_node_ip_address"] = host
            ray.init(address=self.address, **{k: v for k, v in common.items() if k != "include_dashboard"})
        except Exception as exc:
            raise BackendUnavailable(f"could not join the Ray cluster at {self.address}: {_one_line(exc)}") from None

    def _end_owned_cluster(self) -> None:
        """After ``ray.shutdown``: whatever the private cluster left behind, ended by pid, and its dir."""
        procs = []
        for pid in self._owned_pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5.0)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5.0)
        self._owned_pids = []
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # -- hosts ------------------------------------------------------------------------------------------

    def _refresh_nodes(self, nodes: list[dict[str, Any]]) -> None:
        alive = {n["NodeID"] for n in nodes if n.get("Alive")}
        for node_id, known in list(self._hosts.items()):
            if node_id not in alive and known.state is not HostState.FAILED:
                self._host_failed(known, "node is gone")
        for node_id in sorted(alive):
            host = self._hosts.get(node_id)
            if host is None or host.state is HostState.FAILED:
                self._add_host(node_id)

    def _add_host(self, node_id: str) -> None:
        actor_class = ray.remote(WorkerHost)
        actor = actor_class.options(
            num_cpus=0,
            max_concurrency=10000,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self._supervisor_options, os.getpid(), pid_space(), _ORPHAN_TIMEOUT_S)
        host = _Host(node_id, actor)
        host.started = asyncio.get_running_loop().create_future()
        self._hosts[node_id] = host
        self._spawn(self._start_host(host), f"ray-host-{node_id[:8]}")

    async def _start_host(self, host: _Host) -> None:
        try:
            await asyncio.wait_for(asyncio.wrap_future(host.actor.start.remote().future()), _HOST_START_TIMEOUT_S)
        except (RayError, TimeoutError) as exc:
            logger.warning("worker host on node %s did not start: %s", host.node_id[:12], _one_line(exc))
            self._host_failed(host, "did not start")
        else:
            if host.state is HostState.STARTING:
                host.state = HostState.READY
                self._room.set()
        finally:
            assert host.started is not None
            if not host.started.done():
                host.started.set_result(None)

    async def _heartbeat(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(_PING_PERIOD_S)
            hosts = [h for h in self._hosts.values() if h.state is HostState.READY]
            await asyncio.gather(*(self._ping(h) for h in hosts))
            if time.monotonic() - last_refresh >= _NODE_REFRESH_S:
                last_refresh = time.monotonic()
                try:
                    nodes = await asyncio.to_thread(ray.nodes)
                except Exception as exc:
                    logger.warning("could not list Ray nodes: %s", _one_line(exc))
                    continue
                if not self._closed:
                    self._refresh_nodes(nodes)

    async def _ping(self, host: _Host) -> None:
        try:
            counts = await asyncio.wait_for(asyncio.wrap_future(host.actor.ping.remote().future()), _HOST_TIMEOUT_S)
        except TimeoutError:
            self._host_failed(host, f"no answer within {_HOST_TIMEOUT_S:g} s")
        except RayError as exc:
            self._host_failed(host, type(exc).__name__)
        else:
            host.workers = counts["workers"]
            host.pool_ready = counts["pool_ready"]

    def _host_suspect(self, host: _Host) -> None:
        """A call to ``host`` failed: check it now instead of at the next heartbeat."""
        if host.state is HostState.READY and not self._closed:
            self._spawn(self._ping(host), f"ray-ping-{host.node_id[:8]}")

    def _host_gone_or_suspect(self, host: _Host, exc: RayError) -> None:
        """A call failed with ``exc``: a dead actor is failed at once (so the next call goes elsewhere), any
        other error only makes the host suspect."""
        if isinstance(exc, ActorDiedError):
            self._host_failed(host, "actor died")
        else:
            self._host_suspect(host)

    def _host_failed(self, host: _Host, why: str) -> None:
        if host.state is HostState.FAILED:
            return
        logger.warning(
            "worker host on node %s failed (%s): killing it; a new one replaces it if the node lives",
            host.node_id[:12],
            why,
        )
        host.state = HostState.FAILED
        _kill_actor(host.actor)  # its workers' watchdogs see it die and end their groups
        self._room.set()

    async def _acquire_on(
        self,
        host: _Host,
        agent: str,
        options: dict[str, Any],
        cwd: str | None,
        session_id: str | None,
        state: bytes | None,
    ) -> dict[str, Any]:
        ref = host.actor.acquire.remote(agent, options, cwd, session_id, state)
        future = asyncio.wrap_future(ref.future())
        try:
            async with asyncio.timeout(self.start_timeout_s + 5.0):  # keeps a cancel (3.11's wait_for may not)
                return await asyncio.shield(future)
        except TimeoutError:
            future.add_done_callback(lambda f: self._abandon(host, f))
            raise WorkerStartError(
                f"no worker became ready on node {host.node_id[:12]} within {self.start_timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: self._abandon(host, f))
            raise

    def _abandon(self, host: _Host, future: asyncio.Future[dict[str, Any]]) -> None:
        """The caller left while a worker was being made: stop it on its host."""
        if future.cancelled() or future.exception() is not None or not future.result().get("ok"):
            return
        if host.state is not HostState.FAILED:
            host.actor.stop_worker.remote(future.result()["worker_id"])

    def _released(self, worker: RayWorker) -> None:
        if worker in self._workers:
            self._workers.discard(worker)
            worker._host.sessions -= 1
            self._room.set()

    def _observe(self, seconds: float) -> None:
        samples = self.counters.acquire_seconds
        samples.append(seconds)
        if len(samples) > 1024:
            del samples[:512]

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _kill_actor(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
