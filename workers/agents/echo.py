"""``echo``: streams the prompt back word by word (the safe default agent, PROTOCOL section 7).

One ``message.delta`` per word; each delta carries its word with the whitespace that follows it, so the
deltas concatenate back to the prompt exactly.
"""

from __future__ import annotations

import re

from workers.agents.base import Agent, TurnHandle, TurnResult

_WORD = re.compile(r"\S+\s*")


class EchoAgent(Agent):
    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        leading = text[: len(text) - len(text.lstrip())]
        for index, match in enumerate(_WORD.finditer(text)):
            if turn.cancelled:
                return TurnResult("interrupted")
            turn.delta(leading + match.group() if index == 0 else match.group())
        return None
