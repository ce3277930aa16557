"""Agents used only by the worker tests, loaded in workers as ``agents_for_tests:<Name>`` (tests/ is on
the gateway's ``sys.path`` under pytest, and the supervisor hands that path to each worker)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from workers.agents import Agent, TurnHandle, TurnResult


class IgnoreTerm(Agent):
    """A worker that shrugs off SIGTERM: only the SIGKILL after the grace period ends it."""

    def start(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        turn.delta(text)
        return None


class Stubborn(Agent):
    """A turn that never looks at its cancel flag (like C code holding the GIL): only a kill stops it."""

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        turn.delta("working")
        deadline = time.monotonic() + float(text or 60)
        while time.monotonic() < deadline:
            pass
        return None


class FailStart(Agent):
    def start(self) -> None:
        raise RuntimeError("database unreachable")

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        return None


class SlowStart(Agent):
    def start(self) -> None:
        time.sleep(float(self.options.get("seconds", 30)))

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        return None


class Flaky(Agent):
    """Raises on prompts starting with 'boom', dies on 'die', else echoes."""

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        if text.startswith("boom"):
            raise ValueError(f"agent exploded on {text!r}")
        if text == "die":
            os._exit(3)
        turn.delta(text)
        return None


def options_echo(options: dict[str, Any], cwd: str) -> Agent:
    """A factory function (not a class) that reports its options and cwd in each reply."""

    class _Reporter(Agent):
        def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
            turn.delta(f"{sorted(self.options.items())} {self.cwd}")
            return None

    return _Reporter(options, cwd)


class TurnCounter(Agent):
    """Counts its turns through ``snapshot``/``restore``: a fresh worker of the same session (after a
    kill, a crash or a gateway restart) goes on counting where the last one left off.  The prompt
    ``stick N`` holds the CPU for N seconds without looking at its cancel flag (only a kill stops it)."""

    def __init__(self, options: Any, cwd: str) -> None:
        super().__init__(options, cwd)
        self.turns = 0
        self.restored: Any = None

    def restore(self, state: Any) -> None:
        self.restored = state
        self.turns = int(state["turns"])

    def snapshot(self) -> Any:
        return {"turns": self.turns}

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        if text.startswith("stick"):
            deadline = time.monotonic() + float(text.split()[1])
            turn.delta("stuck")
            while time.monotonic() < deadline:
                pass
            return None
        self.turns += 1
        turn.delta(f"turn {self.turns} pid {os.getpid()}")
        return None
