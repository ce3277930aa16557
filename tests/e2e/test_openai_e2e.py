"""The ``openai`` agent end to end: a real gateway, real workers, a scripted server on loopback."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from typing import Any, Iterator

import psutil
import pytest

from support import ROOT, RpcClient, async_wait_for
from openai_fake_server import FakeOpenAI, Script, Stall, chunk, text_script, tool_script

pytestmark = pytest.mark.timeout(120)

API_KEY = "sk-test-" + "0123456789abcdefghijklmnop"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    try:
        yield server
    finally:
        server.close()


def openai_env(fake: FakeOpenAI) -> dict[str, str]:
    return {"WORKER_GATEWAY_OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": API_KEY}


def gateway_keeps_agent_state() -> str | None:
    """None when the gateway side of agent state (keep each session's last ``state`` frame, pass it in the
    next worker's ``init``) is in this tree; else why the tests that need it must skip."""
    sources = "".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py"))
    if "Op.STATE" not in sources:
        return "the gateway does not keep agent state yet (no Op.STATE handling under gateway/)"
    return None


def payloads(client: RpcClient, sid: str, kind: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in client.session_events(sid, kind)]


async def test_openai_streams_a_chat_through_the_gateway_and_the_key_stays_in_the_worker(
        gateway_factory, fake: FakeOpenAI) -> None:
    fake.push(text_script("Hello", " from", " the model"))
    gw = gateway_factory("--agent", "openai", env=openai_env(fake))
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create"))["session_id"]
        done = await client.run_turn(sid, "hi")
        assert done["status"] == "ok" and done["finish_reason"] == "stop" and done["usage"]["total_tokens"] == 10
        assert "".join(p["text"] for p in payloads(client, sid, "message.delta")) == "Hello from the model"
        assert fake.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
        listed = await client.call("session.active_list")
        assert API_KEY not in json.dumps(client.events) + json.dumps(listed)
    assert API_KEY not in gw.stderr()


async def test_a_tool_call_round_trip_through_the_gateway(gateway_factory, fake: FakeOpenAI, tmp_path) -> None:
    command = 'echo "key=[$OPENAI_API_KEY]"; pwd'
    fake.push(tool_script(("call_1", "shell", json.dumps({"command": command}))), text_script("done"))
    gw = gateway_factory(env=openai_env(fake))
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="openai", cwd=str(tmp_path),
                                    options={"base_url": fake.url, "model": "m"})
        sid = created["session_id"]
        assert (await client.run_turn(sid, "where am I?"))["status"] == "ok"
        (call,) = payloads(client, sid, "tool.call")
        assert call["call_id"] == "call_1" and call["arguments"] == {"command": command}
        output = "".join(p["text"] for p in payloads(client, sid, "tool.output") if p["call_id"] == "call_1")
        assert "key=[]" in output and str(tmp_path) in output  # the key is not in the command's environment
        result = [m for m in fake.requests[1].body["messages"] if m["role"] == "tool"][0]
        assert result["tool_call_id"] == "call_1" and str(tmp_path) in result["content"]
        assert API_KEY not in json.dumps(fake.requests[1].body)


async def test_interrupting_a_stalled_stream_keeps_the_worker_and_the_history(gateway_factory,
                                                                              fake: FakeOpenAI) -> None:
    fake.push(Script(steps=[chunk({"content": "thinking about "}), Stall()]), text_script("resumed"))
    # A generous grace: were the interrupt not handled in the worker, the kill at the grace would show up
    # as worker.exited and a new pid.
    gw = gateway_factory("--interrupt-grace-s", "20", env=openai_env(fake))
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="openai")
        sid, pid = created["session_id"], created["worker_pid"]
        await client.call("prompt.submit", session_id=sid, text="long question")
        await client.wait_event(sid, "message.delta")
        await async_wait_for(fake.stalled.is_set, 10, what="the stream to stall")
        assert await client.call("session.interrupt", session_id=sid) == {"status": "interrupted"}
        await client.wait_event(sid, "turn.complete")
        assert payloads(client, sid, "turn.complete")[0]["status"] == "interrupted"
        assert (await client.run_turn(sid, "go on"))["status"] == "ok"
        assert payloads(client, sid, "worker.exited") == [] and psutil.pid_exists(pid)
        assert fake.requests[1].body["messages"] == [
            {"role": "user", "content": "long question"}, {"role": "assistant", "content": "thinking about "},
            {"role": "user", "content": "go on"}]


async def test_history_survives_a_worker_kill(gateway_factory, fake: FakeOpenAI) -> None:
    missing = gateway_keeps_agent_state()
    if missing:
        pytest.skip(missing)
    fake.push(text_script("first"), text_script("second"))
    gw = gateway_factory(env=openai_env(fake))
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="openai")
        sid, pid = created["session_id"], created["worker_pid"]
        assert (await client.run_turn(sid, "one"))["status"] == "ok"
        os.killpg(pid, signal.SIGKILL)
        await client.wait_event(sid, "worker.exited")
        assert (await client.run_turn(sid, "two"))["status"] == "ok"
        assert fake.requests[1].body["messages"] == [
            {"role": "user", "content": "one"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "two"}]


async def test_history_survives_a_gateway_restart(gateway_factory, fake: FakeOpenAI) -> None:
    missing = gateway_keeps_agent_state()
    if missing:
        pytest.skip(missing)
    fake.push(text_script("before"), text_script("after"))
    with tempfile.TemporaryDirectory() as state_dir:
        first = gateway_factory("--state-dir", state_dir, env=openai_env(fake))
        async with RpcClient.connect(first.url()) as client:
            sid = (await client.call("session.create", agent="openai"))["session_id"]
            assert (await client.run_turn(sid, "one"))["status"] == "ok"
            last_seq = client.session_events(sid)[-1]["seq"]
        first.stop()
        second = gateway_factory("--state-dir", state_dir, env=openai_env(fake))
        async with RpcClient.connect(second.url()) as client:
            await client.call("session.resume", session_id=sid, after_seq=last_seq)
            assert (await client.run_turn(sid, "two"))["status"] == "ok"
        assert fake.requests[1].body["messages"] == [
            {"role": "user", "content": "one"}, {"role": "assistant", "content": "before"},
            {"role": "user", "content": "two"}]
