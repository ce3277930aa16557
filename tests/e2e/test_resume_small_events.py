"""A reconnecting client resumes with nothing lost, even after very many small events (issue 13 section 2).

The acceptance test of ``session.ack``: the ``echo`` agent streams 100,000 small ``message.delta`` events
(about 140 bytes each on the wire) through the project's own :class:`GatewayClient`, with default gateway
limits, a consumer that is slightly slower than the stream (so the client's queue, its socket buffer and
the gateway's socket buffer all fill up) and several forced connection aborts (``transport.abort``) in
the middle of the stream.  Whatever sat in the dead socket's buffers must be replayed: zero events lost,
zero ``replay.truncated``, every delta's text intact.

Against a gateway that keeps only its last 4,096 *sent* events for a replay (before ``session.ack``), the
kernel buffers alone hold more than that, so this test fails there, and only on the truncation check.
"""

from __future__ import annotations

import asyncio
import time

from support import TOKEN, GatewayProcess
from gateway.client import GatewayClient, ReplayTruncated
from gateway.wire import EventType

TURNS = 5
WORDS_PER_TURN = 20_000  # 5 x 20,000 = 100,000 deltas; a prompt is ~170 KB, well under the 1 MiB frame limit
ABORT_AT = (12_345, 33_000, 55_555, 77_000, 91_000)  # processed deltas at which the connection is aborted
SLOW_EVERY, SLOW_FOR_S = 200, 0.002  # the consumer pauses this long after every SLOW_EVERY events
DEADLINE_S = 240.0
LAST_SEQ = TURNS * (WORDS_PER_TURN + 2)  # each turn: turn.start, its deltas, turn.complete


def prompt(turn: int) -> str:
    return " ".join(f"t{turn}w{i}" for i in range(WORDS_PER_TURN))


async def test_100k_small_events_survive_several_aborts_with_a_slow_consumer(gateway: GatewayProcess) -> None:
    async with GatewayClient(gateway.url(token=False), token=TOKEN) as client:
        sid = (await client.create_session(agent="echo"))["session_id"]
        events = client.events(sid)

        async def submit_all() -> list[str]:
            # Queued back to back, so the worker streams all 100,000 deltas without a pause.  The answers
            # come behind the first turn's events, so they are read only while the loop below consumes.
            return [(await client.submit(sid, prompt(turn)))["turn_id"] for turn in range(TURNS)]

        submitter = asyncio.ensure_future(submit_all())
        texts: dict[str, list[str]] = {}
        seqs: list[int] = []
        completed: list[dict] = []
        truncations: list[ReplayTruncated] = []
        deltas = 0
        aborts = list(ABORT_AT)
        deadline = time.monotonic() + DEADLINE_S
        last = 0
        while last < LAST_SEQ:  # by seq, not by turn.complete: a truncation gap may have swallowed one
            assert time.monotonic() < deadline, f"only {deltas} deltas and {len(completed)} turns in {DEADLINE_S}s"
            try:
                event = await events.next(timeout=60)
            except asyncio.TimeoutError:
                raise AssertionError(f"no event for 60s after {deltas} deltas, {len(completed)} turns; client "
                                     f"{client.state.value}, {client.stats}, last seq {client.last_seq(sid)}, "
                                     f"processed {client.processed_seq(sid)}") from None
            except ReplayTruncated as exc:  # the failure this test is about: record it, keep going
                truncations.append(exc)
                continue
            last = event["seq"]
            seqs.append(last)
            if event["type"] == EventType.MESSAGE_DELTA:
                deltas += 1
                texts.setdefault(event["payload"]["turn_id"], []).append(event["payload"]["text"])
                if aborts and deltas >= aborts[0] and submitter.done():  # never abort a submit in flight
                    aborts.pop(0)
                    await client.wait_connected(30)
                    client.abort()
            elif event["type"] == EventType.TURN_COMPLETE:
                completed.append(event["payload"])
            if len(seqs) % SLOW_EVERY == 0:
                await asyncio.sleep(SLOW_FOR_S)  # simulated work: a consumer slightly slower than the stream

        turn_ids = submitter.result()
        missing = sum(t.missing for t in truncations)
        assert not truncations, (f"{missing} events lost in {len(truncations)} replay.truncated gaps across "
                                 f"{client.stats.forced_drops} aborts (first: {truncations[0]})")
        assert client.stats.forced_drops == len(ABORT_AT) and client.stats.resumes == len(ABORT_AT)
        assert seqs == list(range(1, len(seqs) + 1)), "the stream has a gap or a duplicate"
        assert deltas == TURNS * WORDS_PER_TURN
        assert [c["status"] for c in completed] == ["ok"] * TURNS
        for turn, turn_id in enumerate(turn_ids):
            assert "".join(texts[turn_id]) == prompt(turn), f"turn {turn}'s deltas do not add up to its prompt"
        await client.close(sid)
