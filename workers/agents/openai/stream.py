"""One streaming Chat Completions request over httpx: retries before the first chunk, cancellation by
shutting the socket down, provider errors as :class:`ProviderError`.

Why the socket: closing an httpx response from another thread does not unblock a read stalled inside it
(measured: 29 s); ``shutdown(SHUT_RDWR)`` on its socket does at once.  The socket is learnt from httpcore's
``connection.connect_tcp`` trace, which is why the client keeps no idle connections: every request opens
its own, and the cancel hook always knows which socket to shut.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx

from workers.agents.base import TurnCancelled, TurnHandle
from workers.agents.openai.retry import RetryPolicy
from workers.agents.openai.settings import Settings
from workers.agents.openai.sse import SSEDecoder

_ERROR_BODY_LIMIT = 64 * 1024
#: Yielded once the stream sent ``data: [DONE]`` (a stream that just ends yields nothing more: the caller
#: tells a cut stream from a complete one by this marker or a ``finish_reason``).
DONE: dict[str, Any] = {"[DONE]": True}


class ProviderError(Exception):
    """The provider failed the request: a non-2xx answer, an error object mid-stream, a cut stream, or no
    connection.  ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def make_client(settings: Settings) -> httpx.Client:
    timeout = httpx.Timeout(
        connect=settings.connect_timeout_s, read=settings.read_timeout_s, write=30.0, pool=settings.connect_timeout_s
    )
    return httpx.Client(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0))


def stream_chunks(
    client: httpx.Client, settings: Settings, body: dict[str, Any], turn: TurnHandle
) -> Iterator[dict[str, Any]]:
    """Yield each parsed chunk of the stream, then :data:`DONE` if the stream sent ``[DONE]``.

    Raises :class:`TurnCancelled` when the turn is cancelled (at once, even in a stalled read) and
    :class:`ProviderError` otherwise.  Connection failures, 429 and 5xx are retried, only before anything
    was yielded."""
    policy = RetryPolicy(max_retries=settings.max_retries)
    attempt = 0
    while True:
        turn.check_cancelled()
        hooks = _SocketHooks(turn)
        try:
            with client.stream(
                "POST",
                settings.chat_url,
                json=body,
                headers=settings.request_headers(),
                extensions={"trace": hooks.trace},
            ) as response:
                if response.status_code // 100 == 2:
                    yield from _chunks(response)
                    # A shut-down socket can also read as a clean end of a close-delimited body.
                    turn.check_cancelled()
                    return
                status = response.status_code
                message = _error_message(response)
                delay = policy.delay(attempt, status, response.headers.get("retry-after"))
                if delay is None:
                    raise ProviderError(f"provider answered {status}: {message}", status)
        except httpx.TransportError as exc:
            if turn.cancelled:
                raise TurnCancelled() from None
            if not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise ProviderError(f"connection to the provider failed: {_describe(exc)}") from None
            delay = policy.delay(attempt, None)
            if delay is None:
                raise ProviderError(f"cannot connect to {settings.chat_url}: {_describe(exc)}") from None
        finally:
            hooks.release()
        attempt += 1
        if turn.wait_cancelled(delay):
            raise TurnCancelled()


def _chunks(response: httpx.Response) -> Iterator[dict[str, Any]]:
    decoder = SSEDecoder()
    for raw in response.iter_bytes():
        for data in decoder.feed(raw):
            chunk = _parse(data)
            yield DONE if chunk is None else chunk
            if chunk is None:
                return
    for data in decoder.finish():
        chunk = _parse(data)
        yield DONE if chunk is None else chunk
        if chunk is None:
            return


def _parse(data: str) -> dict[str, Any] | None:
    """A chunk, or None for ``[DONE]``; an error object becomes :class:`ProviderError`."""
    if data.strip() == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise ProviderError(f"the provider sent a chunk that is not JSON: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise ProviderError(f"the provider sent a chunk that is not an object: {data[:200]!r}")
    if chunk.get("error") is not None:
        error = chunk["error"]
        status = None
        if isinstance(error, dict):
            code = error.get("code") if isinstance(error.get("code"), int) else error.get("status")
            status = code if isinstance(code, int) else None
            error = error.get("message") or json.dumps(error)[:500]
        suffix = f" (status {status})" if status is not None else ""
        raise ProviderError(f"provider error mid-stream{suffix}: {error}", status)
    return chunk


def _error_message(response: httpx.Response) -> str:
    raw = b""
    for part in response.iter_bytes():
        raw += part
        if len(raw) >= _ERROR_BODY_LIMIT:
            break
    text = raw[:_ERROR_BODY_LIMIT].decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
    return text.strip()[:500]


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


class _SocketHooks:
    """Registers a cancel callback for each socket the request opens; :meth:`release` unregisters them."""

    def __init__(self, turn: TurnHandle) -> None:
        self._turn = turn
        self._unregister: list[Any] = []

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            self._unregister.append(self._turn.on_cancel(lambda: _shutdown(sock)))

    def release(self) -> None:
        for unregister in self._unregister:
            unregister()
        self._unregister.clear()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: nothing left to unblock
