"""The gateway's own token never leaves a worker in tool output (issue 13 section 6)."""

from __future__ import annotations

from support import TOKEN


async def test_the_gateway_token_is_redacted_in_tool_output(rpc_connect) -> None:
    async with rpc_connect() as client:
        sid = (await client.call("session.create", agent="shell"))["session_id"]
        done = await client.run_turn(sid, f"echo token={TOKEN}; echo plain-{TOKEN[::-1]}")
        assert done["status"] == "ok"
        output = "".join(e["payload"]["text"] for e in client.session_events(sid, "tool.output"))
        assert TOKEN not in output and "[REDACTED]" in output
        assert f"plain-{TOKEN[::-1]}" in output  # only the secret itself is redacted
