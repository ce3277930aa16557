"""Every response inside the connection's budget (issue 13 section 3): a client that asks for megabytes and
never reads them cannot grow the gateway's memory or freeze its loop for the other clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request

import psutil
import websockets

from support import RpcClient

#: What one non-reading client may cost: its outbound budget (4 MiB), one page in flight (8 MiB), the
#: session's replay (8 MiB), and the interpreter's slack; far below the 900 MB the flood reached before.
_RSS_GROWTH_BOUND = 150 * 1024 * 1024


def _events_since_served(gw) -> float:
    request = urllib.request.Request(gw.http("/metrics"), headers={"Authorization": f"Bearer {gw.token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith('wg_requests_total{method="session.events.since"}'):
            return float(line.split()[-1])
    return 0.0


def _health(gw) -> dict:
    with urllib.request.urlopen(gw.http("/healthz"), timeout=5) as response:
        return json.loads(response.read())


async def _ping_rtt(client: RpcClient) -> float:
    started = time.monotonic()
    await client.call("gateway.ping", timeout=10)
    return time.monotonic() - started


async def test_a_flood_of_events_since_from_a_client_that_does_not_read_stays_bounded(gateway_factory) -> None:
    gw = gateway_factory()
    gateway_proc = psutil.Process(gw.pid)
    async with RpcClient.connect(gw.url()) as owner, RpcClient.connect(gw.url()) as bystander:
        sid = (await owner.call("session.create", agent="load"))["session_id"]
        done = await owner.run_turn(sid, "output_mb=6 chunk_kb=64", timeout=120)
        assert done["status"] == "ok"
        rss_before = gateway_proc.memory_info().rss
        # max_queue=1: the client library stops reading its socket after one message, like a stuck peer.
        async with websockets.connect(gw.url(), max_queue=1, max_size=None) as flooder:
            async def flood() -> None:
                for i in range(250):
                    await flooder.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "session.events.since",
                                                   "params": {"session_id": sid, "after_seq": 0}}))

            task = asyncio.create_task(flood())
            # The gateway stops reading it once its answers exceed the budget; the others are served at once.
            peak = rss_before
            rtts = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                rtts.append(await _ping_rtt(bystander))
                peak = max(peak, gateway_proc.memory_info().rss)
                await asyncio.sleep(0.1)
            served = _events_since_served(gw)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            # ~6 MiB per answer, 4 MiB of budget: a few answers are taken, then its requests wait unread.
            print(f"served {served:.0f}, RSS +{(peak - rss_before) / 1e6:.0f} MB, ping max {max(rtts) * 1000:.0f} ms")
            assert served <= 5, f"the gateway answered {served:.0f} requests that nobody read"
            assert peak - rss_before < _RSS_GROWTH_BOUND, f"RSS grew by {(peak - rss_before) / 1e6:.0f} MB"
            assert max(rtts) < 2.0, f"another client's ping took {max(rtts):.2f} s"
            assert _health(gw)["loop_lag_ms"] < 500
        # The session and the gateway are still fine.
        assert (await owner.call("session.events.since", session_id=sid, after_seq=0))["events"]


async def test_events_since_answers_in_bounded_pages(gateway_factory) -> None:
    gw = gateway_factory("--events-page-max-bytes", "65536")
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create", agent="load"))["session_id"]
        assert (await client.run_turn(sid, "output_mb=1 chunk_kb=16", timeout=60))["status"] == "ok"
        seqs: list[int] = []
        after = 0
        for _ in range(1000):
            page = await client.call("session.events.since", session_id=sid, after_seq=after)
            assert len(json.dumps(page["events"])) < 2 * 65536
            seqs += [event["seq"] for event in page["events"]]
            after = page["next_after_seq"]
            if not page["more"]:
                break
        assert seqs == list(range(1, page["last_seq"] + 1))


async def test_a_huge_title_is_refused(rpc_connect) -> None:
    async with rpc_connect() as client:
        response = await client.request("session.create", {"title": "x" * (512 * 1024)})
        assert response["error"]["code"] == -32602 and "max_title_chars" in response["error"]["message"]


async def test_seq_params_beyond_2_53_are_invalid_params(rpc_connect) -> None:
    async with rpc_connect() as client:
        sid = (await client.call("session.create"))["session_id"]
        response = await client.request("session.events.since", {"session_id": sid, "after_seq": 2**63})
        assert response["error"]["code"] == -32602 and response["error"]["data"]["param"] == "after_seq"


async def test_a_notification_with_bad_params_or_an_unknown_method_gets_no_answer(rpc_connect) -> None:
    async with rpc_connect() as client:
        await client.send_raw(json.dumps({"jsonrpc": "2.0", "method": "no.such.method"}))
        await client.send_raw(json.dumps({"jsonrpc": "2.0", "method": "session.close", "params": {"x": 1}}))
        # A request after them is answered, and nothing else arrived in between.
        assert (await client.call("gateway.ping")) == {"ok": True}
        assert not [r for r in client.responses.values() if "error" in r], client.responses
