"""Agents used only by benchmarks (loaded in workers as ``bench.agents:<name>``)."""

from __future__ import annotations

from workers.agents.base import Agent, TurnHandle, TurnResult


class RelayOnly(Agent):
    """Emits ``mb`` MiB of ``tool.output`` in ``chunk_kb`` KiB events as fast as the pipe takes them.

    It isolates the gateway's relay path: the text needs no JSON escaping and it goes to the turn's raw
    event sink, **skipping the scrubber** (acceptable only because the text is a constant run of ``x``).
    The ``load`` agent is the realistic producer; this one shows what the gateway itself can move.
    Prompt: ``mb=<float> chunk_kb=<int>``.
    """

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        args = dict(token.partition("=")[::2] for token in text.split())
        try:
            total = int(float(args.get("mb", "0")) * 1024 * 1024)
            chunk_kb = int(args.get("chunk_kb", "64"))
        except ValueError as exc:
            return TurnResult("error", error=f"bad prompt {text!r}: {exc}")
        if not 1 <= chunk_kb <= 64:
            return TurnResult("error", error="chunk_kb must be 1..64")
        size = chunk_kb * 1024
        payload = {"turn_id": turn.turn_id, "text": "x" * size, "redactions": 0}
        emit = turn._emit  # noqa: SLF001 - deliberately unscrubbed, see the class docstring
        for _ in range(total // size):
            if turn.cancelled:
                return TurnResult("interrupted")
            emit("tool.output", payload)
        return None


class Deltas(Agent):
    """Emits ``n`` ``message.delta`` events of ``bytes`` characters each (token streaming: the per-event
    cost of the relay path, not its bytes).  Deltas are not scrubbed in any agent (``TurnHandle.delta``).
    Prompt: ``n=<int> bytes=<int>``.
    """

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        args = dict(token.partition("=")[::2] for token in text.split())
        try:
            count = int(args.get("n", "0"))
            size = int(args.get("bytes", "20"))
        except ValueError as exc:
            return TurnResult("error", error=f"bad prompt {text!r}: {exc}")
        if not 1 <= size <= 4096:
            return TurnResult("error", error="bytes must be 1..4096")
        piece = "x" * size
        for i in range(count):
            if i % 256 == 0 and turn.cancelled:
                return TurnResult("interrupted")
            turn.delta(piece)
        return None
