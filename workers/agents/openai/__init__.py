"""The ``openai`` built-in agent (Chat Completions streaming over httpx) and its pure parts: the SSE
decoder, the tool-call accumulator, the retry policy and the history trimming."""

from __future__ import annotations

from workers.agents.openai.agent import OpenAIAgent

__all__ = ["OpenAIAgent"]
