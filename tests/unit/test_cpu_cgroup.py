"""Finding the gateway's cpu cgroup from /proc (workers/cpu_cgroup.py), and the weight a share is: pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.cpu_cgroup import CpuHierarchy, find_cpu_hierarchy, weight_setting

V1_MOUNTS = """\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:7 - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/memory rw,relatime shared:8 - cgroup cgroup rw,memory
40 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
"""
V1_JOINED = "28 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
V2_MOUNTS = "26 23 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup_v1_with_its_own_cpu_hierarchy() -> None:
    found = find_cpu_hierarchy("4:memory:/a/b\n1:cpu:/\n0::/\n", V1_MOUNTS)
    assert found == CpuHierarchy(Path("/sys/fs/cgroup/cpu"), 1)


def test_cgroup_v1_with_cpu_and_cpuacct_joined_and_a_nested_cgroup() -> None:
    found = find_cpu_hierarchy("3:cpu,cpuacct:/system.slice/gw.service\n", V1_JOINED)
    assert found == CpuHierarchy(Path("/sys/fs/cgroup/cpu,cpuacct/system.slice/gw.service"), 1)


def test_cgroup_v2_unified() -> None:
    found = find_cpu_hierarchy("0::/user.slice/session-2.scope\n", V2_MOUNTS)
    assert found == CpuHierarchy(Path("/sys/fs/cgroup/user.slice/session-2.scope"), 2)


def test_a_container_whose_mount_shows_its_own_subtree() -> None:
    mounts = "50 40 0:23 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert find_cpu_hierarchy("0::/docker/abc/inner\n", mounts) == CpuHierarchy(Path("/sys/fs/cgroup/inner"), 2)
    assert find_cpu_hierarchy("0::/elsewhere\n", mounts) is None
    assert find_cpu_hierarchy("0::/docker/abcd\n", mounts) is None  # a sibling whose name starts the same
    assert find_cpu_hierarchy("0::/docker/abc/../../x\n", mounts) is None  # outside the namespace's root


def test_no_cpu_controller_anywhere() -> None:
    assert find_cpu_hierarchy("4:memory:/\n", "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n") is None
    assert find_cpu_hierarchy("", "") is None
    assert find_cpu_hierarchy("garbage\n", "garbage line\n- - -\n") is None


@pytest.mark.parametrize(
    ("version", "share", "setting"),
    [
        (1, 1.0, ("cpu.shares", "1024")),
        (1, 0.25, ("cpu.shares", "256")),
        (1, 0.0, ("cpu.shares", "2")),
        (2, 1.0, ("cpu.weight", "100")),
        (2, 0.25, ("cpu.weight", "25")),
        (2, 0.0, ("cpu.weight", "1")),
        (2, 1000.0, ("cpu.weight", "10000")),
    ],
)
def test_the_weight_of_a_share(version: int, share: float, setting: tuple[str, str]) -> None:
    assert weight_setting(version, share) == setting
