"""The benchmarks' pipe-hop floor (``bench/floor_app.py``) relays what it is asked for and leaves no process."""

from __future__ import annotations

import asyncio
import json

import psutil

from bench.procs import ServerProcess
from bench.rawclient import RawClient
from tests.support import wait_for_gone


async def _transfer(client: RawClient, ask: dict[str, object]) -> tuple[int, int]:
    counters = client.reset_counters()
    done = client.expect_turn(str(ask["turn_id"]))
    await client.send_text(json.dumps(ask))
    result = await asyncio.wait_for(done, 30)
    assert result == {"turn_id": ask["turn_id"], "status": "ok"}
    return counters.events, counters.event_bytes


def test_floor_relays_every_frame_from_its_producer_and_leaves_no_process() -> None:
    server = ServerProcess.floor().start()
    try:

        async def scenario() -> int:
            client = await RawClient.open(server.ws_url("/"))
            producer = int(client.ready.result()["producer_pid"])
            assert psutil.Process(producer).ppid() == server.pid
            events, nbytes = await _transfer(client, {"count": 40, "chunk_kb": 64, "turn_id": "t1"})
            assert events == 41 and nbytes > 40 * 64 * 1024  # the frames and turn.complete
            events, _ = await _transfer(client, {"count": 1000, "delta_bytes": 20, "turn_id": "t2"})
            assert events == 1001
            await client.close()
            return producer

        producer = psutil.Process(asyncio.run(scenario()))
        # the connection's end ends its producer (stdin EOF), while the server goes on
        assert not wait_for_gone([producer], 10)
        assert server.running
    finally:
        server.stop()
    assert not server.running
