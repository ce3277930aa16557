"""Server-sent events, decoded from a byte stream (pure: no I/O).

The Chat Completions stream is an SSE stream of ``data:`` lines.  Bytes arrive in chunks that can split a
line, a UTF-8 sequence or a ``\\r\\n`` anywhere, so the decoder works on bytes and only decodes complete
lines; any split of the same stream yields the same events (tested as a property).  Only what the format
needs is kept: ``data`` (joined by ``\\n`` across lines of one event); ``event``, ``id``, ``retry`` and
comments are ignored.
"""

from __future__ import annotations


class SSEDecoder:
    """Feed bytes, get back the data of each complete event (an event ends at a blank line)."""

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        buffer = self._pending + chunk
        events: list[str] = []
        start = 0
        while True:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                if cr + 1 == len(buffer):
                    break  # a lone \r at the end may be the first half of \r\n: wait for the next byte
                end, next_start = cr, cr + (2 if buffer[cr + 1 : cr + 2] == b"\n" else 1)
            else:
                end, next_start = lf, lf + 1
            self._line(buffer[start:end], events)
            start = next_start
        self._pending = buffer[start:]
        return events

    def finish(self) -> list[str]:
        """The stream ended: a last line without its terminator still counts, an unterminated event does
        not (the spec drops it; a cut stream is detected by the caller from the missing ``[DONE]``)."""
        events: list[str] = []
        if self._pending:
            self._line(self._pending.rstrip(b"\r"), events)
            self._pending = b""
        self._data = []
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        if not raw:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        line = raw.decode("utf-8", "replace")
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
