"""The write path end to end: events travel as UTF-8 bytes from the worker's pipe through the log (and the
store) to the socket, so what a worker sends must become a valid text frame once, and live delivery, a
resume's replay and ``session.events.since`` must show the same text."""

from __future__ import annotations

import json

import pytest

from support import ROOT, RpcClient
from write_path_agents import INVALID_PAYLOAD

TEST_AGENTS_ENV = {"PYTHONPATH": str(ROOT / "tests")}
REPLACED = INVALID_PAYLOAD.decode("utf-8", "replace")


@pytest.mark.parametrize("store", ["store", "no-state"])
async def test_invalid_utf8_from_a_worker_becomes_a_valid_text_frame(gateway_factory, store: str) -> None:
    gw = gateway_factory(*(["--no-state"] if store == "no-state" else []), env=TEST_AGENTS_ENV)
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="write_path_agents:InvalidUtf8")
        sid = created["session_id"]
        assert (await client.run_turn(sid, "go"))["status"] == "ok"
        # websockets fails the connection (1007) on invalid UTF-8 in a text frame: this frame was valid.
        texts = [e["payload"]["text"] for e in client.session_events(sid, "message.delta")]
        assert texts == [json.loads(REPLACED)["text"], "after"]
        assert texts[0] == "caf\xe9 \ufffd stray, \ufffd cut, \ufffd\ufffd\ufffd surrogate, ok \u2713"
        live = client.session_events(sid)
        page = await client.call("session.events.since", session_id=sid, after_seq=0)
        assert page["events"] == live
    async with RpcClient.connect(gw.url()) as again:
        resumed = await again.call("session.resume", session_id=sid, after_seq=0)
        await again.wait(lambda: len(again.session_events(sid)) >= resumed["last_seq"], 20)
        assert again.session_events(sid) == live
