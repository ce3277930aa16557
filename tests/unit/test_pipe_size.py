"""Sizing the worker -> gateway pipe (workers/launch.py): the pure clamp, and F_SETPIPE_SZ on real pipes."""

from __future__ import annotations

import os

import pytest

from workers import launch


def test_pipe_size_is_the_request_within_the_kernel_maximum() -> None:
    assert launch.pipe_size_for(256 * 1024, sessions=66, soft_limit_pages=16384, max_size=1 << 20) == 256 * 1024
    assert launch.pipe_size_for(4 << 20, sessions=1, soft_limit_pages=None, max_size=1 << 20) == 1 << 20


def test_pipe_size_leaves_room_in_the_per_user_quota() -> None:
    # 16,384 pages = 64 MiB; half of it over 1,000 sessions is ~33 KB: rounded down to 8 pages.
    assert launch.pipe_size_for(256 * 1024, sessions=1000, soft_limit_pages=16384, max_size=1 << 20) == 32 * 1024
    assert launch.pipe_size_for(256 * 1024, sessions=10**6, soft_limit_pages=16384, max_size=None) == 4096


def test_pipe_size_is_a_power_of_two_of_pages_and_zero_keeps_the_default() -> None:
    assert launch.pipe_size_for(300 * 1024, sessions=1, soft_limit_pages=None, max_size=None) == 256 * 1024
    assert launch.pipe_size_for(0, sessions=1, soft_limit_pages=16384, max_size=1 << 20) == 0


def test_widen_pipe_sets_the_size_on_a_real_pipe() -> None:
    r, w = os.pipe()
    try:
        assert launch.widen_pipe(r, 256 * 1024) == 256 * 1024
        assert launch.pipe_size(r) == launch.pipe_size(w) == 256 * 1024
        assert launch.widen_pipe(r, 0) is None  # 0: left as it is
        assert launch.pipe_size(r) == 256 * 1024
    finally:
        os.close(r)
        os.close(w)


def test_widen_pipe_reports_a_refusal_instead_of_raising() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 20000)  # more than one page queued: shrinking to one page is EBUSY
        assert launch.widen_pipe(r, 4096) is None
        assert launch.pipe_size(r) == 64 * 1024
    finally:
        os.close(r)
        os.close(w)
    with open(os.devnull, "rb") as not_a_pipe:
        assert launch.widen_pipe(not_a_pipe.fileno(), 256 * 1024) is None


@pytest.mark.skipif(not os.path.exists("/proc/sys/fs/pipe-max-size"), reason="Linux /proc limits")
def test_worker_pipe_size_reads_this_machines_limits() -> None:
    size = launch.worker_pipe_size(256 * 1024, 66)
    assert 4096 <= size <= 256 * 1024 and size & (size - 1) == 0
