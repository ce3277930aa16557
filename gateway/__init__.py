"""worker-gateway: a WebSocket gateway whose event loop only relays frames."""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("worker-gateway")
except Exception:  # not installed (running from a source tree)
    __version__ = "0.0.0+src"

PROTOCOL_VERSION = 1
