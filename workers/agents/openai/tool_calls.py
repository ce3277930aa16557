"""Tool calls streamed in pieces, put back together (pure: no I/O).

A streamed assistant message carries ``tool_calls`` deltas, each with an ``index`` naming the call it
continues.  Servers differ: OpenAI sends the id and name once, then argument fragments; llama.cpp repeats
the name in every delta.  So the first non-empty id and name win (never concatenated) and only
``arguments`` fragments are appended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    index: int
    call_id: str
    name: str
    arguments: str  #: the raw JSON text, as the model wrote it (sent back as is in the history)

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as an object; raises ValueError with a message for the model otherwise."""
        text = self.arguments.strip() or "{}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not valid JSON ({exc.msg} at position {exc.pos})") from None
        if not isinstance(value, dict):
            raise ValueError(f"arguments must be a JSON object, got {type(value).__name__}")
        return value

    def as_message_entry(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolCallAccumulator:
    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: Any) -> None:
        """Take the ``tool_calls`` list of one delta (malformed entries are skipped)."""
        if not isinstance(deltas, list):
            return
        for position, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                continue
            index = delta.get("index", position)
            if not isinstance(index, int):
                continue
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": []})
            if isinstance(delta.get("id"), str) and delta["id"] and not call["id"]:
                call["id"] = delta["id"]
            function = delta.get("function")
            if isinstance(function, dict):
                name = function.get("name")
                if isinstance(name, str) and name and not call["name"]:
                    call["name"] = name
                fragment = function.get("arguments")
                if isinstance(fragment, str):
                    call["arguments"].append(fragment)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def calls(self, id_prefix: str = "call") -> list[ToolCall]:
        """The calls in index order; a call the server sent without an id gets one (the history needs
        an id to pair the tool result with its call)."""
        return [
            ToolCall(index, call["id"] or f"{id_prefix}_{index}", call["name"], "".join(call["arguments"]))
            for index, call in sorted(self._calls.items())
        ]
