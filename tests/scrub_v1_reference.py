"""Frozen copy of workers/scrub.py before the prefilter (issue 18 §4): the oracle the new scrubber must
equal.  Do not edit: tests/test_scrub_prefilter.py compares the live scrubber against it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

REDACTED = "[REDACTED]"
#: Largest text of one ``tool.output`` event, in UTF-8 bytes (PROTOCOL: chunks of at most 64 KiB).
MAX_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Rule:
    """One kind of secret: ``group`` is the part replaced (0 = the whole match)."""

    kind: str
    pattern: re.Pattern[str]
    group: int = 0
    #: When set, a match that continues a word (``risk-assessment-...`` is no ``sk-`` key) is retried at
    #: the first ``inner`` match inside it (``mask-sk-proj-...`` still holds one); checking this in code
    #: rather than with a look-behind keeps the pattern's literal prefix, which makes ``re`` 30x faster.
    inner: re.Pattern[str] | None = None


_RULES: tuple[_Rule, ...] = (
    # scheme://user:password@host -> scheme://user:[REDACTED]@host
    _Rule("url_password", re.compile(r"://[^\s:/?#@]{0,256}:([^\s/?#@]{1,256})@"), group=1),
    _Rule("bearer", re.compile(r"Bearer[ \t]{1,16}([A-Za-z0-9._~+/=-]{8,})"), group=1),
    _Rule("bearer", re.compile(r"bearer[ \t]{1,16}([A-Za-z0-9._~+/=-]{8,})"), group=1),
    _Rule("aws_access_key", re.compile(r"A[KS]IA[0-9A-Z]{16}")),
    _Rule("api_key", re.compile(r"sk-[A-Za-z0-9_-]{20,}"), inner=re.compile(r"[-_]sk-[A-Za-z0-9_-]{20,}")),
    _Rule("github_token", re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}")),
    _Rule("github_pat", re.compile(r"github_pat_[A-Za-z0-9_]{22,}")),
    _Rule("slack_token", re.compile(r"xox[abprs]-[A-Za-z0-9-]{10,}")),
)

_PEM_BEGIN = re.compile(r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY-----")
_PEM_END = re.compile(r"-----END[A-Z0-9 ]{0,40}PRIVATE KEY-----")
# An unterminated block (truncated output): redact the header and the base64 lines that follow it.
_PEM_TAIL = re.compile(r"[A-Za-z0-9+/=\r\n]*")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


class _Mark:
    """A redaction marker piece (distinct from user text that happens to read ``[REDACTED]``)."""

    __slots__ = ()
    text = REDACTED


_MARK = _Mark()
_Piece = str | _Mark


def scrub(text: str) -> tuple[str, int]:
    """Return ``(text with secrets replaced by [REDACTED], number of redactions)``."""
    pieces = _scrub_pieces(text)
    if len(pieces) == 1 and isinstance(pieces[0], str):
        return pieces[0], 0
    count = 0
    parts: list[str] = []
    for piece in pieces:
        if piece is _MARK:
            count += 1
            parts.append(REDACTED)
        else:
            parts.append(piece)  # type: ignore[arg-type]
    return "".join(parts), count


def scrub_chunks(text: str, max_bytes: int = MAX_CHUNK_BYTES) -> Iterator[tuple[str, int]]:
    """Scrub ``text`` and cut the result into chunks of at most ``max_bytes`` UTF-8 bytes, each with the
    number of redactions it contains.  Scrubbing happens before cutting, so no secret escapes by
    straddling a chunk boundary."""
    if max_bytes < len(REDACTED.encode()) + 4:
        raise ValueError(f"max_bytes must be at least {len(REDACTED) + 4}")
    parts: list[str] = []
    size = 0
    count = 0
    for piece in _scrub_pieces(text):
        if piece is _MARK:
            if size + len(REDACTED) > max_bytes:
                yield "".join(parts), count
                parts, size, count = [], 0, 0
            parts.append(REDACTED)
            size += len(REDACTED)
            count += 1
            continue
        assert isinstance(piece, str)
        for fragment, fragment_size in _split_utf8(piece, max_bytes - size, max_bytes):
            if size + fragment_size > max_bytes:
                yield "".join(parts), count
                parts, size, count = [], 0, 0
            parts.append(fragment)
            size += fragment_size
    if parts:
        yield "".join(parts), count


def _split_utf8(text: str, first: int, rest: int) -> Iterator[tuple[str, int]]:
    """Yield ``(fragment, utf8_size)``: the first fragment fits in ``first`` bytes (when > 0), the others
    in ``rest`` bytes; never splits a character."""
    if text.isascii():
        size = len(text)
        if size <= first:
            yield text, size
            return
        pos = 0
        if first > 0:
            yield text[:first], first
            pos = first
        while pos < size:
            fragment = text[pos:pos + rest]
            yield fragment, len(fragment)
            pos += rest
        return
    raw = text.encode("utf-8")
    pos = 0
    budget = first if first > 0 else rest
    while pos < len(raw):
        end = min(pos + budget, len(raw))
        while end < len(raw) and (raw[end] & 0xC0) == 0x80:  # do not cut inside a character
            end -= 1
        if end == pos:  # budget smaller than one character: start a fresh chunk
            if budget == rest:
                raise ValueError("chunk size smaller than one character")
            budget = rest
            continue
        yield raw[pos:end].decode("utf-8"), end - pos
        pos = end
        budget = rest


def _scrub_pieces(text: str) -> list[_Piece]:
    pieces = _pem_pieces(text)
    for rule in _RULES:
        pieces = _rule_pieces(pieces, rule)
    return pieces


def _pem_pieces(text: str) -> list[_Piece]:
    if "-----BEGIN" not in text:
        return [text]
    pieces: list[_Piece] = []
    pos = 0
    end_search_failed = False  # once no END follows some point, none follows any later point either
    while True:
        begin = _PEM_BEGIN.search(text, pos)
        if begin is None:
            break
        end = None if end_search_failed else _PEM_END.search(text, begin.end())
        if end is None:
            end_search_failed = True
            stop = _PEM_TAIL.match(text, begin.end()).end()  # type: ignore[union-attr]
        else:
            stop = end.end()
        if begin.start() > pos:
            pieces.append(text[pos:begin.start()])
        pieces.append(_MARK)
        pos = stop
    if pos < len(text) or not pieces:
        pieces.append(text[pos:])
    return pieces


def _rule_pieces(pieces: list[_Piece], rule: _Rule) -> list[_Piece]:
    out: list[_Piece] = []
    for piece in pieces:
        if piece is _MARK:
            out.append(piece)
            continue
        assert isinstance(piece, str)
        pos = 0
        for match in rule.pattern.finditer(piece):
            start, stop = match.span(rule.group)
            if rule.inner is not None and start > 0 and piece[start - 1] in _ALNUM:
                retry = rule.inner.search(piece, start + 1, stop)
                if retry is None:
                    continue
                start = retry.start() + 1
            if start > pos:
                out.append(piece[pos:start])
            out.append(_MARK)
            pos = stop
        if pos == 0:
            out.append(piece)
        elif pos < len(piece):
            out.append(piece[pos:])
    return out


class StreamBuffer:
    """Cuts a stream of text (a command's output, read in arbitrary blocks) into pieces that no secret
    straddles, so each piece can be scrubbed on its own.

    A piece ends at a line break (every token pattern lives within one line) and never inside a PEM block
    whose END has not arrived yet.  ``max_pending`` bounds what is held back: past it, text is released at
    the last line break, or whole, so a never-ending line cannot grow memory without bound.
    """

    def __init__(self, max_pending: int = 1024 * 1024) -> None:
        self._pending = ""
        self._max_pending = max_pending

    @property
    def pending(self) -> int:
        return len(self._pending)

    def feed(self, text: str) -> str:
        """Add ``text``; return the prefix of everything buffered that is safe to scrub now (maybe "")."""
        self._pending += text
        buf = self._pending
        cut = buf.rfind("\n") + 1
        begin = _last_open_pem(buf)
        if begin is not None:
            cut = min(cut, begin)
        if len(buf) - cut > self._max_pending:
            cut = buf.rfind("\n") + 1 or len(buf)
            if len(buf) - cut > self._max_pending:
                cut = len(buf)
        out, self._pending = buf[:cut], buf[cut:]
        return out

    def flush(self) -> str:
        """Everything still held (end of stream)."""
        out, self._pending = self._pending, ""
        return out


def _last_open_pem(text: str) -> int | None:
    """Start of the last PEM header in ``text`` that has no END after it, or None."""
    if "-----BEGIN" not in text:
        return None
    last = None
    for last in _PEM_BEGIN.finditer(text):
        pass
    if last is None or _PEM_END.search(text, last.end()) is not None:
        return None
    return last.start()
