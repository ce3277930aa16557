"""worker-gateway: a WebSocket gateway whose event loop only relays frames."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from gateway.wire import PROTOCOL_VERSION

try:
    __version__ = version("worker-gateway")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"


__all__ = ["PROTOCOL_VERSION", "__version__"]
