"""Agents: the interface (``base``), how names resolve to agents (``registry``), and the built-ins."""

from __future__ import annotations

from workers.agents.base import Agent, TurnCancelled, TurnHandle, TurnResult

__all__ = ["Agent", "TurnCancelled", "TurnHandle", "TurnResult"]
