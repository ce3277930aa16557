"""The ``openai`` agent in real workers against a real scripted server on loopback (tests/openai_fake_server).

Each test asserts what the agent emitted *and* what it sent to the server (recorded requests)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from openai_fake_server import (DONE, FakeOpenAI, Pause, Script, Stall, chunk, error_script, sse, text_script,
                                tool_script)
from test_agents import acquire_with_state
from worker_helpers import complete_of, run_turn, supervisor  # noqa: F401  (supervisor is a fixture)
from workers.channel import Frame, Kind
from workers.ops import Op
from workers.scrub import REDACTED
from workers.supervisor import Supervisor, WorkerStartError

pytestmark = pytest.mark.timeout(90)

FAKE_KEY = "AKIA" + "IOSFODNN7EXAMPLE"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    try:
        yield server
    finally:
        server.close()


def of(events: list, kind: str) -> list[dict[str, Any]]:
    return [payload for name, payload in events if name == kind]


async def agent(sup: Supervisor, fake: FakeOpenAI, **options: Any) -> Any:
    return await sup.acquire("openai", {"base_url": fake.url, "model": "test-model", **options}, None, "s1")


async def interrupt_when(handle: Any, turn_id: str, ready: Any, timeout: float = 30) -> list[tuple[str, Any]]:
    """Run a turn, send ``cancel`` once ``ready(events)`` is true, collect up to its ``turn.complete``."""
    handle.send("prompt", {"turn_id": turn_id, "text": "go"})
    events: list[tuple[str, Any]] = []
    sent = False

    async def collect() -> None:
        nonlocal sent
        frames = handle.frames()
        while True:
            if not sent and ready(events):
                handle.send("cancel", {"turn_id": turn_id})
                sent = True
            try:
                frame = await asyncio.wait_for(anext(frames), 0.05)
            except TimeoutError:
                continue
            if frame.kind is Kind.EVENT:
                events.append((frame.name, json.loads(frame.body)))
            if frame.name == "turn.complete":
                return

    await asyncio.wait_for(collect(), timeout)
    assert sent
    return events


# -- streaming ----------------------------------------------------------------------------------------------

async def test_text_streams_as_deltas_with_reasoning_usage_and_finish_reason(supervisor: Supervisor,
                                                                              fake: FakeOpenAI) -> None:
    fake.push(text_script("Hel", "lo", " there", reasoning=["thinking", " hard"],
                          usage={"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}))
    handle = await agent(supervisor, fake, system="be brief", temperature=0.5, max_tokens=64,
                         headers={"X-Proxy-Token": "proxy-secret-123"})
    events = await run_turn(handle, "hi")
    assert [p["text"] for p in of(events, "message.delta")] == ["Hel", "lo", " there"]
    assert [p["text"] for p in of(events, "reasoning.delta")] == ["thinking", " hard"]
    done = complete_of(events)
    assert done["status"] == "ok" and done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["x-proxy-token"] == "proxy-secret-123"
    body = request.body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "test-model" and body["temperature"] == 0.5 and body["max_tokens"] == 64
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert [t["function"]["name"] for t in body["tools"]] == ["shell", "delegate"]
    assert "proxy-secret-123" not in json.dumps(events)


async def test_the_next_turn_carries_the_history(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(text_script("first answer"), text_script("second answer"))
    handle = await agent(supervisor, fake, tools=[])
    await run_turn(handle, "one", turn_id="t1")
    await run_turn(handle, "two", turn_id="t2")
    assert fake.requests[1].body["messages"] == [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "two"}]
    assert "tools" not in fake.requests[1].body


# -- provider errors and retries ----------------------------------------------------------------------------

async def test_a_mid_stream_error_object_fails_the_turn_with_its_message(supervisor: Supervisor,
                                                                         fake: FakeOpenAI) -> None:
    fake.push(Script(steps=[chunk({"content": "par"}),
                            sse({"error": {"message": "model overloaded", "code": 503}})]))
    handle = await agent(supervisor, fake)
    done = complete_of(await run_turn(handle, "hi"))
    assert done["status"] == "error" and "model overloaded" in done["error"] and "503" in done["error"]
    assert len(fake.requests) == 1  # tokens had streamed: never retried


async def test_a_cut_stream_fails_the_turn(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(Script(steps=[chunk({"content": "half an ans"})]))
    handle = await agent(supervisor, fake)
    done = complete_of(await run_turn(handle, "hi"))
    assert done["status"] == "error" and "cut off" in done["error"]


async def test_429_is_retried_after_retry_after_then_succeeds(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(error_script(429, "slow down", retry_after="0.2"), text_script("ok now"))
    handle = await agent(supervisor, fake)
    events = await run_turn(handle, "hi")
    assert complete_of(events)["status"] == "ok"
    assert [p["text"] for p in of(events, "message.delta")] == ["ok now"]
    assert len(fake.requests) == 2 and fake.requests[0].body == fake.requests[1].body


async def test_500_after_the_retries_reports_the_provider_status_and_message(supervisor: Supervisor,
                                                                             fake: FakeOpenAI) -> None:
    fake.push(error_script(500, "kaput"), error_script(500, "kaput"))
    handle = await agent(supervisor, fake, max_retries=1)
    done = complete_of(await run_turn(handle, "hi"))
    assert done["status"] == "error" and done["provider_status"] == 500
    assert done["error"] == "provider answered 500: kaput"
    assert len(fake.requests) == 2


async def test_400_is_not_retried(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(error_script(400, "unknown model 'x'"))
    handle = await agent(supervisor, fake)
    done = complete_of(await run_turn(handle, "hi"))
    assert done["error"] == "provider answered 400: unknown model 'x'" and len(fake.requests) == 1


async def test_an_unreachable_server_fails_with_a_clear_error(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    closed = FakeOpenAI()
    url = closed.url
    closed.close()
    handle = await supervisor.acquire("openai", {"base_url": url, "max_retries": 1}, None, "s1")
    done = complete_of(await run_turn(handle, "hi"))
    assert done["status"] == "error" and "cannot connect to" in done["error"]


async def test_bad_options_fail_the_session_start_naming_the_option(supervisor: Supervisor) -> None:
    with pytest.raises(WorkerStartError, match="'temperature'"):
        await supervisor.acquire("openai", {"temperature": "hot"}, None, "s1")


# -- tools --------------------------------------------------------------------------------------------------

async def test_a_split_tool_call_runs_and_the_model_gets_the_scrubbed_output(supervisor: Supervisor,
                                                                             fake: FakeOpenAI, tmp_path) -> None:
    (tmp_path / "marker.txt").write_text("x")
    args = json.dumps({"command": f"ls; echo key={FAKE_KEY}"})
    fake.push(tool_script(("call_a", "shell", args), split=3), text_script("done"))
    handle = await supervisor.acquire("openai", {"base_url": fake.url}, str(tmp_path), "s1")
    events = await run_turn(handle, "list files")
    assert of(events, "tool.call") == [{"turn_id": "t1", "call_id": "call_a", "name": "shell",
                                        "arguments": {"command": f"ls; echo key={FAKE_KEY}"}}]
    outputs = of(events, "tool.output")
    assert outputs and all(p["call_id"] == "call_a" for p in outputs)
    shown = "".join(p["text"] for p in outputs)
    assert "marker.txt" in shown and FAKE_KEY not in shown and REDACTED in shown
    assert complete_of(events)["status"] == "ok"
    second = fake.requests[1].body["messages"]
    assert second[1]["tool_calls"] == [{"id": "call_a", "type": "function",
                                        "function": {"name": "shell", "arguments": args}}]
    tool_result = second[2]
    assert tool_result["role"] == "tool" and tool_result["tool_call_id"] == "call_a"
    assert "marker.txt" in tool_result["content"] and REDACTED in tool_result["content"]
    assert FAKE_KEY not in tool_result["content"]  # (the model's own command line still holds it)
    assert "[exit code 0]" in tool_result["content"]


async def test_parallel_tool_calls_with_repeated_names_run_in_order(supervisor: Supervisor,
                                                                    fake: FakeOpenAI) -> None:
    fake.push(tool_script(("c1", "shell", '{"command": "echo one"}'), ("c2", "shell", '{"command": "echo two"}'),
                          repeat_name=True), text_script("both ran"))
    handle = await agent(supervisor, fake)
    events = await run_turn(handle, "run both")
    assert [(p["call_id"], p["name"]) for p in of(events, "tool.call")] == [("c1", "shell"), ("c2", "shell")]
    results = [m for m in fake.requests[1].body["messages"] if m["role"] == "tool"]
    assert [(m["tool_call_id"], m["content"].split("\n")[0]) for m in results] == [("c1", "one"), ("c2", "two")]


async def test_invalid_arguments_and_unknown_tools_go_back_to_the_model_as_errors(supervisor: Supervisor,
                                                                                  fake: FakeOpenAI) -> None:
    fake.push(tool_script(("c1", "shell", '{"command": '), ("c2", "delegate", '{"task": "x"}')),
              text_script("sorry"))
    handle = await agent(supervisor, fake, tools=["shell"])
    events = await run_turn(handle, "try")
    assert of(events, "tool.call")[0]["arguments"] == '{"command": '  # raw text when it is not JSON
    results = [m["content"] for m in fake.requests[1].body["messages"] if m["role"] == "tool"]
    assert "not valid JSON" in results[0] and "no tool named 'delegate'" in results[1]
    assert [t["function"]["name"] for t in fake.requests[0].body["tools"]] == ["shell"]


async def test_tool_choice_is_sent_with_the_first_request_of_a_turn_only(supervisor: Supervisor,
                                                                         fake: FakeOpenAI) -> None:
    choice = {"type": "function", "function": {"name": "shell"}}
    fake.push(tool_script(("c1", "shell", '{"command": "true"}')), text_script("ok"))
    handle = await agent(supervisor, fake, tool_choice=choice)
    await run_turn(handle, "go")
    assert fake.requests[0].body["tool_choice"] == choice and "tool_choice" not in fake.requests[1].body


async def test_tool_output_is_capped_and_a_slow_command_times_out(supervisor: Supervisor,
                                                                  fake: FakeOpenAI) -> None:
    fake.push(tool_script(("c1", "shell", '{"command": "yes"}'), ("c2", "shell", '{"command": "sleep 60"}')),
              text_script("ok"))
    handle = await agent(supervisor, fake, tool_output_chars=1000, tool_timeout_s=0.5)
    events = await run_turn(handle, "go")
    assert sum(len(p["text"]) for p in of(events, "tool.output") if p["call_id"] == "c1") <= 1000
    capped, slow = [m["content"] for m in fake.requests[1].body["messages"] if m["role"] == "tool"]
    assert "output passed 1000 bytes" in capped and "longer than 0.5 s" in slow


async def test_the_tool_round_cap_ends_the_turn(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    call = '{"command": "true"}'
    fake.push(tool_script(("c1", "shell", call)), tool_script(("c2", "shell", call)))
    handle = await agent(supervisor, fake, max_tool_rounds=1)
    done = complete_of(await run_turn(handle, "loop"))
    assert done["status"] == "error" and "max_tool_rounds" in done["error"]
    assert len(fake.requests) == 2


# -- delegate -----------------------------------------------------------------------------------------------

async def test_delegate_runs_a_fresh_subagent_and_the_parent_gets_its_summary(supervisor: Supervisor,
                                                                              fake: FakeOpenAI) -> None:
    fake.push(tool_script(("d1", "delegate", '{"task": "count files"}')), text_script("there are ", "3"),
              text_script("The subagent says 3."))
    handle = await agent(supervisor, fake, system="parent system")
    events = await run_turn(handle, "how many files?")
    (start,) = of(events, "subagent.start")
    assert start["task"] == "count files" and start["call_id"] == "d1"
    assert "".join(p["text"] for p in of(events, "subagent.progress")) == "there are 3"
    (complete,) = of(events, "subagent.complete")
    assert complete["subagent_id"] == start["subagent_id"]
    assert complete["status"] == "ok" and complete["summary"] == "there are 3"
    child = fake.requests[1].body
    assert child["messages"][1:] == [{"role": "user", "content": "count files"}]  # a fresh history
    assert child["messages"][0]["role"] == "system" and "parent system" not in child["messages"][0]["content"]
    assert [t["function"]["name"] for t in child["tools"]] == ["shell"]  # no delegate inside
    parent_result = [m for m in fake.requests[2].body["messages"] if m["role"] == "tool"]
    assert parent_result == [{"role": "tool", "tool_call_id": "d1", "content": "there are 3"}]
    assert complete_of(events)["status"] == "ok"


async def test_an_interrupt_reaches_a_stalled_subagent(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(tool_script(("d1", "delegate", '{"task": "wait"}')), Script(steps=[chunk({"content": "hm"}), Stall()]))
    handle = await agent(supervisor, fake)
    events = await interrupt_when(handle, "t1", lambda ev: fake.stalled.is_set())
    assert complete_of(events)["status"] == "interrupted"
    (complete,) = of(events, "subagent.complete")
    assert complete["status"] == "interrupted"
    assert handle.alive


# -- interrupts and history ---------------------------------------------------------------------------------

async def test_interrupting_a_stalled_stream_keeps_the_worker_and_the_history(supervisor: Supervisor,
                                                                             fake: FakeOpenAI) -> None:
    fake.push(Script(steps=[chunk({"content": "partial "}), Stall()]), text_script("recovered"))
    handle = await agent(supervisor, fake)
    pid = handle.pid
    events = await interrupt_when(handle, "t1", lambda ev: fake.stalled.is_set() and of(ev, "message.delta"))
    assert complete_of(events)["status"] == "interrupted"
    assert handle.alive and handle.pid == pid
    assert complete_of(await run_turn(handle, "again", turn_id="t2"))["status"] == "ok"
    assert fake.requests[1].body["messages"] == [
        {"role": "user", "content": "go"}, {"role": "assistant", "content": "partial "},
        {"role": "user", "content": "again"}]


async def test_interrupting_a_request_stalled_before_its_headers(supervisor: Supervisor,
                                                                 fake: FakeOpenAI) -> None:
    fake.push(Script(stall_before_headers=True))
    handle = await agent(supervisor, fake)
    events = await interrupt_when(handle, "t1", lambda ev: fake.stalled.is_set())
    assert complete_of(events)["status"] == "interrupted" and handle.alive


async def test_interrupting_a_slow_stream_keeps_what_was_shown(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    steps: list[Any] = []
    for n in range(200):
        steps += [chunk({"content": f"w{n} "}), Pause(0.05)]
    fake.push(Script(steps=steps + [chunk({}, "stop"), DONE]), text_script("next"))
    handle = await agent(supervisor, fake)
    events = await interrupt_when(handle, "t1", lambda ev: len(of(ev, "message.delta")) >= 3)
    assert complete_of(events)["status"] == "interrupted"
    shown = "".join(p["text"] for p in of(events, "message.delta"))
    await run_turn(handle, "next", turn_id="t2")
    assert fake.requests[1].body["messages"][1] == {"role": "assistant", "content": shown}


async def test_an_interrupt_during_a_tool_call_answers_the_call(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(tool_script(("c1", "shell", '{"command": "echo started; sleep 60"}')), text_script("fine"))
    handle = await agent(supervisor, fake)
    events = await interrupt_when(handle, "t1", lambda ev: of(ev, "tool.output"))
    assert complete_of(events)["status"] == "interrupted"
    await run_turn(handle, "next", turn_id="t2")
    messages = fake.requests[1].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user"]
    assert "[interrupted by the user]" in messages[2]["content"]


# -- snapshot / restore -------------------------------------------------------------------------------------

async def test_the_snapshot_holds_the_history_and_no_secret(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(text_script("hello"))
    handle = await agent(supervisor, fake, headers={"Authorization": "Bearer sk-proxy-secret-999"})
    frames: list[Frame] = []
    await run_turn(handle, "hi", on_frame=frames.append)
    (state,) = [f for f in frames if f.kind is Kind.CONTROL and f.name == Op.STATE]
    assert state.json() == {"state": {"version": 1, "history": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}}
    assert b"sk-proxy-secret-999" not in state.body
    assert fake.requests[0].headers["authorization"] == "Bearer sk-proxy-secret-999"


async def test_a_restored_worker_sends_the_saved_history(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(text_script("again"))
    saved = {"version": 1, "history": [{"role": "user", "content": "before"},
                                       {"role": "assistant", "content": "the crash"}]}
    acquired = await acquire_with_state(supervisor, "openai", saved, {"base_url": fake.url})
    handle = acquired[0] if isinstance(acquired, tuple) else acquired
    await run_turn(handle, "after")
    assert fake.requests[0].body["messages"] == saved["history"] + [{"role": "user", "content": "after"}]


async def test_history_is_trimmed_to_its_budget(supervisor: Supervisor, fake: FakeOpenAI) -> None:
    fake.push(text_script("a" * 900), text_script("b" * 900), text_script("c"))
    handle = await agent(supervisor, fake, history_chars=2000, tools=[])
    for n in range(3):
        await run_turn(handle, f"turn {n} " + "x" * 300, turn_id=f"t{n}")
    third = fake.requests[2].body["messages"]
    assert third[0]["content"].startswith("turn 1")  # turn 0 was dropped, whole
    assert sum(len(m["content"]) for m in third) <= 2000
