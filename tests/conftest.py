"""Fixtures: a real gateway process on 127.0.0.1 and a raw JSON-RPC WebSocket client.

The gateway runs as a subprocess (``python -m gateway serve --port 0``) exactly as users start it; the
fixture reads its ready line, and at teardown stops it with SIGTERM and asserts that it exits 0 and that
no process it started (workers, their children, slash workers, terminals) outlives it.  The helpers the
fixtures use live in ``support.py``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis  # noqa: F401  imported up front: the hypothesis plugin imports it lazily in pytest's

#                  summary, which after some failures trips a CPython 3.11 AST bug and hides the report
import psutil
import pytest
from support import GatewayProcess, RpcClient, wait_for_gone


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(*args: str, **kwargs: Any) -> GatewayProcess:
        gw = GatewayProcess(*args, **kwargs).start()
        started.append(gw)
        return gw

    yield make
    errors = []
    for gw in started:
        try:
            code = gw.stop()
            if code not in (0, None, -9) and gw.proc and gw.proc.returncode != -signal.SIGKILL:
                errors.append(f"gateway exited {code}: {gw.stderr()[-2000:]}")
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, "\n".join(errors)


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    return gateway_factory()


@pytest.fixture
def rpc_connect(gateway: GatewayProcess) -> Callable[..., Any]:
    def connect(**kwargs: Any) -> Any:
        return RpcClient.connect(gateway.url(), **kwargs)

    return connect


@pytest.fixture
def no_process_outlives_the_test() -> Iterator[None]:
    """Every process this test started (a store writer, a pipe's peer) is gone within 10 s of its end."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    started = [p for p in me.children(recursive=True) if p.pid not in before]
    left = wait_for_gone(started, timeout=10.0)
    assert not left, f"processes outlived the test: {[(p.pid, p.cmdline()) for p in left]}"
