"""The client's JSON codec: compact on the way out, tolerant on the way in.

Private and tiny on purpose: the client's only dependency inside the project is the wire vocabulary
(``gateway.wire``), so it does not borrow the server's codec (``gateway.rpc``).
"""

from __future__ import annotations

import json
from typing import Any


def encode(message: dict[str, Any]) -> str:
    """One JSON-RPC message as a text frame, without spaces (the gateway counts bytes)."""
    return json.dumps(message, separators=(",", ":"))


def decode_object(raw: str | bytes) -> dict[str, Any] | None:
    """The frame's JSON object, or ``None`` for a frame that is not a JSON object."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None
