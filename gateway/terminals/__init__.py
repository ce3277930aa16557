"""Terminals (PROTOCOL section 6): the registry, each terminal's PTY fd side, and the ``/pty`` socket relay."""

from gateway.terminals.pty_side import INPUT_MAX, OUT_HIGH_WATER, OUT_LOW_WATER, REPLAY_BYTES, Terminal
from gateway.terminals.registry import TerminalRegistry

__all__ = ["INPUT_MAX", "OUT_HIGH_WATER", "OUT_LOW_WATER", "REPLAY_BYTES", "Terminal", "TerminalRegistry"]
