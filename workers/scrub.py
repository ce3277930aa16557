"""Secret redaction for tool output, run in worker processes before anything leaves them.

Every pattern is compiled once, starts with a literal (so ``re`` can skip ahead with its fast prefix search)
and has no nested or overlapping quantifiers, so scanning is linear in the input: a hostile 10 MB line
costs milliseconds, never a catastrophic backtrack.  PEM blocks, whose bodies are long and multi-line, are
found with plain ``str.find``-style scanning instead of a lazy ``.*?`` that would go quadratic on a stream
of unterminated headers.

The result is kept as *pieces* (plain text or a redaction marker) so that output can be cut into
<= 64 KiB events without splitting a marker and with an exact per-event redaction count.

Speed: each rule carries a *hint* that all its matches contain, and one multi-pattern scan of the text
(workers/scrub_prefilter.py: Hyperscan, else RE2, else none) picks the rules that can match at all; only
those run.  A 64 KiB chunk without secrets costs ~10 µs instead of ~450 µs, with identical results.

Extra secrets: a :class:`Scrubber` also redacts literal strings it is given (the gateway's own token, sent
to the worker over the init pipe, never through its environment or argv); :func:`set_extra_secrets`
installs them in the worker's default scrubber, which :func:`scrub` and :func:`scrub_chunks` use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from workers.scrub_prefilter import Prefilter, PrefilterKind, build_prefilter

REDACTED = "[REDACTED]"
#: Largest text of one ``tool.output`` event, in UTF-8 bytes (PROTOCOL: chunks of at most 64 KiB).
MAX_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Rule:
    """One kind of secret: ``group`` is the part replaced (0 = the whole match)."""

    kind: str
    pattern: re.Pattern[str]
    #: A Hyperscan/RE2 pattern that every match of ``pattern`` contains (the prefilter looks for it).
    hint: str
    group: int = 0
    #: When set, a match that continues a word (``risk-assessment-...`` is no ``sk-`` key) is retried at
    #: the first ``inner`` match inside it (``mask-sk-proj-...`` still holds one); checking this in code
    #: rather than with a look-behind keeps the pattern's literal prefix, which makes ``re`` 30x faster.
    inner: re.Pattern[str] | None = None


_RULES: tuple[_Rule, ...] = (
    # scheme://user:password@host -> scheme://user:[REDACTED]@host
    _Rule("url_password", re.compile(r"://[^\s:/?#@]{0,256}:([^\s/?#@]{1,256})@"), "://", group=1),
    _Rule("bearer", re.compile(r"Bearer[ \t]{1,16}([A-Za-z0-9._~+/=-]{8,})"), "Bearer", group=1),
    _Rule("bearer", re.compile(r"bearer[ \t]{1,16}([A-Za-z0-9._~+/=-]{8,})"), "bearer", group=1),
    _Rule("aws_access_key", re.compile(r"A[KS]IA[0-9A-Z]{16}"), "A[KS]IA"),
    _Rule("api_key", re.compile(r"sk-[A-Za-z0-9_-]{20,}"), "sk-", inner=re.compile(r"[-_]sk-[A-Za-z0-9_-]{20,}")),
    _Rule("github_token", re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"), "gh[pousr]_"),
    _Rule("github_pat", re.compile(r"github_pat_[A-Za-z0-9_]{22,}"), "github_pat_"),
    _Rule("slack_token", re.compile(r"xox[abprs]-[A-Za-z0-9-]{10,}"), "xox[abprs]-"),
)
_PEM_HINT = "-----BEGIN"
#: Extra secrets shorter than this are not redacted: they would cut ordinary words out of the output.
MIN_EXTRA_SECRET_CHARS = 8

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


class Scrubber:
    """The rules plus ``extra_secrets`` (literal strings, e.g. the gateway's token), behind one prefilter.

    Building one compiles the prefilter (~1 ms); keep it.  Thread-safe: agents emit from several threads.
    """

    def __init__(self, extra_secrets: Iterable[str] = (), prefilter: PrefilterKind = PrefilterKind.AUTO) -> None:
        literals = sorted({s for s in extra_secrets if len(s) >= MIN_EXTRA_SECRET_CHARS}, key=len, reverse=True)
        # Extra secrets run right after PEM blocks, before the token rules: a token inside a URL or after
        # "Bearer" is then one whole redaction.
        extra = tuple(
            _Rule("gateway_secret", re.compile(re.escape(literal)), _literal_hint(literal))
            for literal in literals
            if literal.isascii()
        )
        self._unhinted = tuple(
            _Rule("gateway_secret", re.compile(re.escape(literal)), "") for literal in literals if not literal.isascii()
        )
        self._rules = extra + _RULES
        hints = [_PEM_HINT] + [rule.hint for rule in self._rules]
        self._prefilter: Prefilter = build_prefilter(hints, prefilter)

    @property
    def prefilter(self) -> PrefilterKind:
        return self._prefilter.kind

    def scrub(self, text: str) -> tuple[str, int]:
        """Return ``(text with secrets replaced by [REDACTED], number of redactions)``."""
        return _join(self._pieces(text))

    def scrub_chunks(self, text: str, max_bytes: int = MAX_CHUNK_BYTES) -> Iterator[tuple[str, int]]:
        """See the module function :func:`scrub_chunks`."""
        _check_chunk_size(max_bytes)
        return _cut(self._pieces(text), max_bytes)

    def _pieces(self, text: str) -> list[_Piece]:
        """``text`` cut into plain pieces and redaction markers."""
        found = self._prefilter.candidates(text)
        pieces: list[_Piece] = _pem_pieces(text) if found is None or 0 in found else [text]
        for rule in self._unhinted:  # non-ASCII literals (no hint): always run, a plain substring search
            pieces = _rule_pieces(pieces, rule)
        for index, rule in enumerate(self._rules, start=1):
            if found is None or index in found:
                pieces = _rule_pieces(pieces, rule)
        return pieces


def _literal_hint(literal: str) -> str:
    """``literal`` as a pattern in the syntax Hyperscan and RE2 share: letters and digits as they are,
    everything else as a ``\\xHH`` escape."""
    return "".join(c if c.isalnum() else f"\\x{ord(c):02x}" for c in literal)


_default: Scrubber | None = Scrubber()  # built at import: the forkserver's workers share it
_pending_secrets: list[str] | None = None


def set_extra_secrets(secrets: Iterable[str]) -> None:
    """Make the worker's default scrubber also redact ``secrets`` (called once, from the init frame).

    The scrubber is built on first use: compiling its multi-pattern database costs ~1.5 ms, which would
    otherwise be paid on every ``session.create`` (the worker is ready only after its init), scrubbing or not."""
    global _default, _pending_secrets
    _pending_secrets = list(secrets)
    _default = None


def scrub(text: str) -> tuple[str, int]:
    """Return ``(text with secrets replaced by [REDACTED], number of redactions)``."""
    return _default_scrubber().scrub(text)


def _default_scrubber() -> Scrubber:
    global _default, _pending_secrets
    if _default is None:
        _default = Scrubber(extra_secrets=_pending_secrets or ())
        _pending_secrets = None
    return _default


def _join(pieces: list[_Piece]) -> tuple[str, int]:
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
    return _default_scrubber().scrub_chunks(text, max_bytes)


def _check_chunk_size(max_bytes: int) -> None:
    if max_bytes < len(REDACTED.encode()) + 4:
        raise ValueError(f"max_bytes must be at least {len(REDACTED) + 4}")


def _cut(pieces: list[_Piece], max_bytes: int) -> Iterator[tuple[str, int]]:
    parts: list[str] = []
    size = 0
    count = 0
    for piece in pieces:
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
            fragment = text[pos : pos + rest]
            yield fragment, len(fragment)
            pos += rest
        return
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate counts its 3 bytes; it is no crash
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
        yield raw[pos:end].decode("utf-8", "surrogatepass"), end - pos
        pos = end
        budget = rest


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
            pieces.append(text[pos : begin.start()])
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
    for last in _PEM_BEGIN.finditer(text):  # noqa: B007 - the loop finds the last match
        pass
    if last is None or _PEM_END.search(text, last.end()) is not None:
        return None
    return last.start()
