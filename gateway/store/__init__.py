"""The session store: a durable event log, agent state and session table behind one writer process.

``EventStore`` (``client.py``) is the gateway-side handle; the writer process (``writer_main.py``) holds
the only SQLite connection (``sqlite_writer.py``); ``pipe.py`` is the protocol between them, and the seam
a distributed store plugs into.  See docs/store.md.
"""

from __future__ import annotations

from gateway.store.client import EventStore
from gateway.store.errors import StoreCorrupt, StoreError, StoreLocked

__all__ = ["EventStore", "StoreCorrupt", "StoreError", "StoreLocked"]
