"""The conversation history kept per session, and its trimming to a character budget (pure: no I/O).

No tokenizer (it would download files at run time): characters are the budget, a fair proxy for tokens.
Trimming drops the oldest messages first and never leaves the history starting with an assistant or tool
message (a tool result without its call is rejected by servers); the latest user message and everything
after it are always kept, even over budget, so the current turn is never cut.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]


def message_chars(message: Message) -> int:
    size = len(str(message.get("content") or ""))
    if message.get("tool_calls"):
        size += len(json.dumps(message["tool_calls"], ensure_ascii=False))
    return size


def trim_history(messages: list[Message], budget_chars: int) -> list[Message]:
    """The newest suffix of ``messages`` that fits ``budget_chars`` and starts at a user message."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    total = sum(message_chars(m) for m in messages)
    start = 0
    while start < last_user and total > budget_chars:
        total -= message_chars(messages[start])
        start += 1
    while start < last_user and messages[start].get("role") != "user":
        total -= message_chars(messages[start])
        start += 1
    return messages[start:]


def valid_history(value: Any) -> list[Message]:
    """A restored history, checked: a list of messages with a known role (raises ValueError)."""
    if not isinstance(value, list):
        raise ValueError("history must be a list of messages")
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "tool", "system"):
            raise ValueError(f"not a chat message: {str(message)[:80]!r}")
    return [dict(m) for m in value]
