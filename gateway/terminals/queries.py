"""Terminal *queries* in a terminal's output, found by parsing control sequences, and removed from replays.

A query is a sequence a program writes to ask the terminal something (cursor position, device
attributes, a colour...).  Replayed to a fresh view it would make that view answer again, and the answer
would arrive as garbage input at the shell prompt, so replays leave queries out; live output keeps them.

CSI sequences are parsed by their grammar, not matched by spelling: an introducer (7-bit ``ESC [``, the
8-bit C1 byte ``9B`` where it cannot be part of a UTF-8 character, or U+009B encoded as UTF-8 ``C2 9B``),
parameter bytes ``0x30-0x3F``, intermediate bytes ``0x20-0x2F``, one final byte ``0x40-0x7E``.  Whether a
CSI is a query depends on its final byte, its intermediates and its private marker, never on how its
numbers are spelled (``ESC[6n``, ``ESC[06n`` and ``ESC[0006n`` are one query).  OSC queries (``...;?``),
DCS requests (DECRQSS, XTGETTCAP) and ENQ are removed too.

:class:`QueryStripper` does the work incrementally as output arrives (a sequence split across two reads
is held back until it is complete), so attaching a view costs one copy of an already clean buffer.
"""

from __future__ import annotations

import re

_INTRO = rb"(?:\x1b\[|\xc2\x9b|(?<![\x80-\xff])\x9b)"
_NUM = rb"[0-9;:]*"
#: Complete query sequences (C speed: ``re`` skips plain text quickly).
_QUERY = re.compile(
    rb"\x05"  # ENQ: answerback request
    rb"|" + _INTRO + rb"(?:"
    rb"\??" + _NUM + rb"n"  # DSR: 5n, 6n, 06n, ?6n, ?996n ...
    rb"|[>=]?" + _NUM + rb"c"  # DA1 / DA2 / DA3: c, 0c, 00c, >c, =c
    rb"|>" + _NUM + rb"q"  # XTVERSION
    rb"|\??" + _NUM + rb"\$[pwu]"  # DECRQM, DECRQPSR, DECRQTSR
    rb"|" + _NUM + rb"x"  # DECREQTPARM
    rb"|\?" + _NUM + rb"[umS]"  # kitty keyboard, XTQMODKEYS, XTSMGRAPHICS
    rb"|0*(?:1[1345689]|2[01])(?:;[0-9]*)*t"  # XTWINOPS reports (state, size, title)
    rb")"
    rb"|\x1b\][0-9]+;(?:[^\x07\x1b]{0,128};)?\?(?:\x07|\x1b\\)"  # OSC colour / clipboard queries (...;?)
    rb"|\x1bP[$+]q[^\x1b]{0,512}\x1b\\"  # DCS DECRQSS, XTGETTCAP
)
#: A sequence that has begun but not ended at the end of the data seen so far.
_INCOMPLETE = re.compile(
    rb"(?:" + _INTRO + rb"[\x30-\x3f]*[\x20-\x2f]*"
    rb"|\x1b\][^\x07\x1b]{0,160}(?:\x1b)?"
    rb"|\x1bP[^\x1b]{0,600}(?:\x1b)?"
    rb"|\x1b|\xc2"
    rb")\Z"
)
#: How far back from the end an unfinished sequence is looked for (the longest query kept whole).
_HOLD_MAX = 640


def strip_terminal_queries(data: bytes) -> bytes:
    """``data`` without complete terminal query sequences.  An incomplete sequence at the very end is kept:
    its tail is still to come live, so it is a live query."""
    return _QUERY.sub(b"", data)


def _split_unfinished(data: bytes) -> int:
    """Where an unfinished sequence at the end of ``data`` starts (``len(data)`` if there is none)."""
    start = max(0, len(data) - _HOLD_MAX)
    match = _INCOMPLETE.search(data, start)
    return match.start() if match else len(data)


class QueryStripper:
    """A terminal's replay, kept free of queries as output arrives: ``feed`` each read, ``snapshot`` at attach.

    Holds at most ``limit`` clean bytes (trimmed in bulk), plus the unfinished sequence at the end."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._clean = bytearray()
        self._held = b""

    def feed(self, data: bytes) -> None:
        data = self._held + data
        cut = _split_unfinished(data)
        self._held = data[cut:]
        self._clean += _QUERY.sub(b"", data[:cut])
        if len(self._clean) > 2 * self._limit:  # one memmove per ``limit`` bytes, not one per read
            del self._clean[: -self._limit]

    def snapshot(self) -> bytes:
        """The last ``limit`` bytes of output without queries (an unfinished sequence at the end included)."""
        return bytes(self._clean[-self._limit :]) + self._held
