"""One CPU cgroup for all of the gateway's local agent workers, so that together they weigh a fixed share
of the gateway's CPU weight, whatever their number.

Per-session scheduling groups (``workers/priority.py``, ``workers/cpu_weight.py``) cannot go below nice
19, so 64 busy sessions weigh at least 64 x 15, about the gateway's 1024, and at the burst of their first
events the loop lost the CPU in slices of 0.2 to 3 ms to newly woken workers (``perf sched``).  Measured
at 64 streaming sessions (``--no-state``, four alternated runs each), loop lag p99: 4.6 to 45.8 ms with
autogroups, 2.0 to 41.2 with the workers in one cgroup of the gateway's weight, 2.8 to 9.4 with one of a
quarter of it; one session's relay rates were the same with either.  Inside the cgroup autogroups do not
apply, and the workers' own nice ranks them against each other and their keepers.

The cgroup is a child of the gateway's own, for the ``cpu`` controller: cgroup v1's cpu hierarchy, or
the root of a cgroup v2 hierarchy (anywhere else in v2 the gateway's own cgroup holds a process, the
gateway, and the kernel refuses it children with controllers).  That takes root (or a delegated v1
hierarchy); without it the gateway falls back to autogroups.  The forkserver is moved in, so every worker
it forks is born there; a forkserver started again later is moved in by the supervisor too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("worker_gateway.workers")

PREFIX = "worker-gateway-"  # then the gateway's pid, a dot and a number (one per supervisor)
_numbers = itertools.count(1)
V1_DEFAULT_SHARES = 1024  # cpu.shares of a nice-0 group
V2_DEFAULT_WEIGHT = 100  # cpu.weight of the same


@dataclass(frozen=True)
class CpuHierarchy:
    """Where the calling process's cgroup for the ``cpu`` controller is, and which version it is."""

    path: Path
    version: int


def find_cpu_hierarchy(proc_cgroup: str, mountinfo: str) -> CpuHierarchy | None:
    """The cpu-controller directory of the process whose ``/proc/<pid>/cgroup`` and ``mountinfo`` these are
    (pure: the caller reads the files); None when there is none."""
    mounts: dict[str, tuple[str, str]] = {}  # "v1" / "v2" -> (mount point, the mount's root in the hierarchy)
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if len(fields) < dash + 3 or dash < 5:
            continue
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup" and "cpu" in options:
            mounts.setdefault("v1", (fields[4], fields[3]))
        elif fstype == "cgroup2":
            mounts.setdefault("v2", (fields[4], fields[3]))
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "" and "v2" in mounts and "v1" not in mounts:
            return _under(mounts["v2"], path, 2)
        if "cpu" in controllers.split(",") and "v1" in mounts:
            return _under(mounts["v1"], path, 1)
    return None


def _under(mount: tuple[str, str], path: str, version: int) -> CpuHierarchy | None:
    point, root = mount
    inside = root == "/" or path == root or path.startswith(root.rstrip("/") + "/")
    if not inside or "/.." in path:
        return None  # our cgroup is outside what this mount shows (another namespace's view)
    relative = path[len(root) :].lstrip("/")
    return CpuHierarchy(Path(point) / relative if relative else Path(point), version)


def weight_setting(version: int, share: float) -> tuple[str, str]:
    """The file and value that give a cgroup ``share`` times a nice-0 group's weight."""
    if version == 1:
        return "cpu.shares", str(max(2, round(V1_DEFAULT_SHARES * share)))
    return "cpu.weight", str(min(10000, max(1, round(V2_DEFAULT_WEIGHT * share))))


class WorkerCgroup:
    """The workers' cgroup: made by :meth:`create`, processes moved in by :meth:`enter`, removed by
    :meth:`remove` once they have ended."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, share: float) -> WorkerCgroup | None:
        """A new cgroup of ``share`` times the gateway's weight, or None (logged) where none can be made."""
        try:
            hierarchy = find_cpu_hierarchy(
                Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text()
            )
        except OSError:
            hierarchy = None
        if hierarchy is None:
            logger.info("no cpu cgroup hierarchy: workers are weighed by their sessions' autogroups")
            return None
        _remove_stale(hierarchy.path)
        path = hierarchy.path / f"{PREFIX}{os.getpid()}.{next(_numbers)}"
        try:
            if hierarchy.version == 2:
                _delegate_cpu(hierarchy.path)
            path.mkdir()
            name, value = weight_setting(hierarchy.version, share)
            (path / name).write_text(value)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.rmdir()
            logger.info(
                "cannot make a cpu cgroup for the workers in %s (%s): they are weighed by their sessions' autogroups",
                hierarchy.path,
                exc.strerror or exc,
            )
            return None
        logger.info("workers run in cgroup %s (%s %s)", path, name, value)
        return cls(path)

    def enter(self, pid: int) -> bool:
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            logger.warning("cannot move process %d into %s: %s", pid, self.path, exc.strerror or exc)
            return False
        return True

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:  # EBUSY: a process is still in it (a forkserver that other users keep)
            logger.warning("cgroup %s not removed: %s", self.path, exc.strerror or exc)


def _delegate_cpu(parent: Path) -> None:
    control = parent / "cgroup.subtree_control"
    if "cpu" not in control.read_text().split():
        control.write_text("+cpu")  # refused unless parent is the root or holds no process itself (left on)


def _remove_stale(parent: Path) -> None:
    """Remove what a gateway killed before its cleanup left: empty cgroups of pids no longer running."""
    try:
        entries = list(parent.glob(f"{PREFIX}*"))
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(PREFIX) :].partition(".")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                entry.rmdir()
