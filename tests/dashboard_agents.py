"""Agents for the dashboard's browser tests, named as ``tests.dashboard_agents:<Name>`` (module:attr).

``ToolCaller`` emits what the ``openai`` agent emits (reasoning, a tool call and its output grouped by
``call_id``, usage in ``turn.complete``) so the page's rendering of those events is tested without a model.
"""

from __future__ import annotations

from workers.agents.base import Agent, TurnHandle, TurnResult


class ToolCaller(Agent):
    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        emit = turn._emit  # TurnHandle has no helper for these two event types
        emit("reasoning.delta", {"turn_id": turn.turn_id, "text": "thinking about " + text})
        emit("tool.call", {"turn_id": turn.turn_id, "call_id": "call-1", "name": "grep",
                           "arguments": '{"pattern": "needle"}'})
        turn.tool_output("\x1b[32mneedle\x1b[0m found in \x1b[1;34mhay.txt\x1b[0m\n", call_id="call-1")
        turn.delta("The **needle** is in `hay.txt`.")
        return TurnResult(extra={"usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
