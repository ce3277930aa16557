"""The one error family of the session store; every member carries the JSON-RPC code a client sees."""

from __future__ import annotations

from gateway.wire import ErrorCode


class StoreError(Exception):
    """The store cannot do what was asked (the writer is gone, the disk is full, an I/O error)."""

    code = ErrorCode.STORE_UNAVAILABLE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StoreLocked(StoreError):
    """Another gateway holds the state directory; the message names its pid."""

    def __init__(self, message: str, holder_pid: int | None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


class StoreCorrupt(StoreError):
    """The database file is not a valid SQLite database; it is never recreated over the user's data."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path
