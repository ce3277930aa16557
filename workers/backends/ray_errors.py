"""The error a backend raises when it cannot run at all: imported by the gateway without importing Ray."""

from __future__ import annotations


class BackendUnavailable(Exception):
    """The configured worker backend cannot start (missing extra, unreachable cluster): the gateway prints
    the one-line message and exits 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
