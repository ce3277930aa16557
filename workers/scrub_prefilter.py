"""One multi-pattern pass that tells the scrubber which of its rules can match a text at all.

Why: most tool output holds no secret, yet the scrubber used to run nine regex passes over every chunk
(250-400 µs per 64 KiB, issue 18).  Each rule has a *hint*, a tiny pattern that every match of the rule
contains (``sk-`` for API keys...).  One scan for all hints at once finds the rules worth running; the
others cannot match and are skipped, so the result is exactly what running every rule gives.

Backends, best first (all linear-time on any input):

- ``hyperscan`` (Intel's SIMD multi-pattern matcher; wheels for Linux x86-64): ~10 µs per 64 KiB;
- ``re2`` (``google-re2``'s ``RE2::Set``, the dependency elsewhere): ~110 µs per 64 KiB;
- ``none``: every rule runs (what the scrubber did before; used if neither library imports).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
from typing import Any, Protocol


class PrefilterKind(enum.Enum):
    AUTO = "auto"
    HYPERSCAN = "hyperscan"
    RE2 = "re2"
    NONE = "none"


class Prefilter(Protocol):
    kind: PrefilterKind

    def candidates(self, text: str) -> frozenset[int] | None:
        """Indexes of the hints found in ``text``; None means "could not tell: run every rule"."""


class NoPrefilter:
    kind = PrefilterKind.NONE

    def candidates(self, text: str) -> frozenset[int] | None:
        return None


class HyperscanPrefilter:
    """Block-mode database of every hint; one scratch space per thread (a scratch serves one scan at a
    time, and agents may emit tool output from several threads)."""

    kind = PrefilterKind.HYPERSCAN

    def __init__(self, hints: Sequence[str]) -> None:
        import hyperscan

        self._hs = hyperscan
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(
            expressions=[h.encode("utf-8") for h in hints],
            ids=list(range(len(hints))),
            flags=[hyperscan.HS_FLAG_SINGLEMATCH] * len(hints),
        )
        self._local = threading.local()

    def candidates(self, text: str) -> frozenset[int] | None:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._hs.Scratch(self._db)
        found: set[int] = set()

        def on_match(hint: int, start: int, end: int, flags: int, context: Any) -> None:
            found.add(hint)

        # UTF-8 bytes: an ASCII hint occurs in them exactly where it occurs in the text (multi-byte
        # sequences never contain ASCII bytes); surrogatepass keeps lone surrogates scannable.
        try:
            self._db.scan(text.encode("utf-8", "surrogatepass"), match_event_handler=on_match, scratch=scratch)
        except self._hs.HyperscanError:  # e.g. out of memory for scratch: run every rule rather than fail
            return None
        return frozenset(found)


class Re2Prefilter:
    kind = PrefilterKind.RE2

    def __init__(self, hints: Sequence[str]) -> None:
        import re2

        self._set = re2.Set.SearchSet(re2.Options())
        for hint in hints:
            self._set.Add(hint)
        self._set.Compile()

    def candidates(self, text: str) -> frozenset[int] | None:
        try:
            return frozenset(self._set.Match(text) or ())  # None when nothing matched
        except UnicodeError:  # a lone surrogate has no UTF-8 form for RE2
            return None


def build_prefilter(hints: Sequence[str], kind: PrefilterKind = PrefilterKind.AUTO) -> Prefilter:
    """The requested backend, or with ``AUTO`` the best one that imports and compiles here.  Hints must
    be ASCII patterns in the common subset of Hyperscan and RE2 syntax (literals and ``[...]``)."""
    if any(not hint.isascii() for hint in hints):
        raise ValueError("prefilter hints must be ASCII")
    if kind is PrefilterKind.NONE:
        return NoPrefilter()
    order = [kind] if kind is not PrefilterKind.AUTO else [PrefilterKind.HYPERSCAN, PrefilterKind.RE2]
    for backend in order:
        try:
            return HyperscanPrefilter(hints) if backend is PrefilterKind.HYPERSCAN else Re2Prefilter(hints)
        except Exception:  # not installed, no wheel for this CPU, or a compile error: try the next one
            if kind is not PrefilterKind.AUTO:
                raise
    return NoPrefilter()
