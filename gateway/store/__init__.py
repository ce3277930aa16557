"""The session store: a durable event log, agent state and session table behind one writer process.

``EventStore`` (``client.py``) is the gateway-side handle; the writer process (``writer_main.py``) holds
the only SQLite connection (``sqlite_writer.py``); ``pipe.py`` is the protocol between them, and the seam
a distributed store plugs into.  See docs/store.md.

The names below are imported on first use, so that the writer process, which imports this package on
its way to ``writer_main``, does not pay for asyncio and the client at every start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.store.client import EventStore
    from gateway.store.errors import StoreCorrupt, StoreError, StoreLocked

__all__ = ["EventStore", "StoreCorrupt", "StoreError", "StoreLocked"]


def __getattr__(name: str) -> Any:
    if name == "EventStore":
        from gateway.store.client import EventStore

        return EventStore
    if name in ("StoreCorrupt", "StoreError", "StoreLocked"):
        from gateway.store import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'gateway.store' has no attribute {name!r}")
