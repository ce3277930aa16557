"""The one spawned-gateway helper (``gateway/client/spawn.py``): ready line with a deadline, stderr on
failure, SIGTERM and wait on stop, nothing left behind."""

from __future__ import annotations

import os
import sys

import pytest

from support import alive, descendants, wait_for_gone
from gateway.client.spawn import (
    DEFAULT_GATEWAY_ARGS,
    PACKAGE_ROOT,
    ReadyLineProcess,
    SpawnedGateway,
    SpawnError,
    child_env,
    gateway_command,
)
from gateway.loadtest.cli import join_gateway_args
from gateway.wire import READY_LINE_PREFIX


def test_a_spawned_gateway_reports_its_port_and_stops_cleanly_on_sigterm() -> None:
    gateway = SpawnedGateway("--pool-size", "1", token="spawn-token").start(timeout=60)
    try:
        assert gateway.ready_line.startswith(f"{READY_LINE_PREFIX} port={gateway.port}")
        assert gateway.url() == f"ws://127.0.0.1:{gateway.port}/ws?token=spawn-token"
        started = alive(descendants(gateway.pid))  # e.g. the warm pool
    finally:
        code = gateway.stop()
    assert code == 0 and not gateway.running
    assert wait_for_gone(started, 10) == []
    assert gateway.stop() == 0  # idempotent


def test_a_gateway_that_fails_to_start_raises_with_its_stderr_and_is_gone() -> None:
    gateway = SpawnedGateway("--no-such-flag", token="t")
    with pytest.raises(SpawnError) as info:
        gateway.start(timeout=60)
    assert "exited with status 2 before it was ready" in info.value.reason
    assert "unrecognized arguments: --no-such-flag" in info.value.stderr
    assert gateway.proc is not None and gateway.proc.poll() == 2


def test_no_ready_line_within_the_deadline_is_an_error_and_the_process_is_stopped() -> None:
    silent = ReadyLineProcess([sys.executable, "-c", "import time; time.sleep(600)"], name="silent")
    with pytest.raises(SpawnError) as info:
        silent.start(timeout=0.5)
    assert "no ready line within 0.5s" in info.value.reason
    assert silent.proc is not None and silent.proc.poll() is not None


def test_any_server_with_a_ready_line_works_and_its_later_output_is_drained() -> None:
    code = ("import sys, time; print('X_READY port=4242', flush=True); "
            "[print('x' * 1000, flush=True) for _ in range(500)]; time.sleep(600)")
    server = ReadyLineProcess([sys.executable, "-c", code], ready_prefix="X_READY", name="chatty").start(timeout=30)
    try:
        assert server.port == 4242 and server.running
    finally:
        server.stop(grace=10)
    assert not server.running


def test_the_command_puts_the_defaults_first_and_the_token_as_one_argument() -> None:
    command = gateway_command("--agent", "echo", "--no-state", token="-dash", python="py")
    assert command == ["py", "-m", "gateway", "serve", "--port", "0", *DEFAULT_GATEWAY_ARGS, "--token=-dash",
                       "--agent", "echo", "--no-state"]
    assert gateway_command(token=None, python="py", defaults=("--no-state",)) == [
        "py", "-m", "gateway", "serve", "--port", "0", "--no-state"]


def test_a_spawned_gateway_never_uses_the_default_state_dir() -> None:
    """Without --state-dir / --no-state it gets a fresh temporary one: never the user's lock."""
    first, second = (gateway_command(token=None, python="py") for _ in range(2))
    dirs = [next(a for a in c if a.startswith("--state-dir=")) for c in (first, second)]
    assert dirs[0] != dirs[1] and all(os.path.isdir(d.split("=", 1)[1]) for d in dirs)


def test_the_child_environment_has_this_tree_importable_and_can_drop_variables(monkeypatch) -> None:
    monkeypatch.setenv("WORKER_GATEWAY_TOKEN", "from-the-parent")
    env = child_env({"WORKER_GATEWAY_TOKEN": None, "EXTRA": "1"})
    assert "WORKER_GATEWAY_TOKEN" not in env and env["EXTRA"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PACKAGE_ROOT)


def test_gateway_args_given_with_a_space_are_joined_for_argparse() -> None:
    assert join_gateway_args(["--gateway-arg", "--backend", "--gateway-arg=ray", "--spawn"]) == \
        ["--gateway-arg=--backend", "--gateway-arg=ray", "--spawn"]
    assert join_gateway_args(["--gateway-arg"]) == ["--gateway-arg"]  # argparse reports the missing value
