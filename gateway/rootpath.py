"""Serving under a path prefix (``--root-path /gw``) behind a reverse proxy, whether or not it strips it.

uvicorn's own ``root_path`` assumes the proxy strips the prefix (it prepends it to every path), so a proxy
that forwards ``/gw/ws`` unchanged would reach ``/gw/gw/ws``.  This middleware accepts both forms and
direct requests without the prefix: it records the prefix as the ASGI ``root_path`` and makes ``path``
start with it, which is what starlette's routing strips.  The bare prefix (``/gw``) is redirected to
``/gw/`` so that the dashboard's relative URLs resolve under it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def normalize_root_path(value: str) -> str:
    """``gw/``, ``/gw/`` and ``/gw`` all mean ``/gw``; ``""`` and ``/`` mean no prefix."""
    text = value.strip().strip("/")
    return "/" + text if text else ""


def prefixed(path: str, root_path: str) -> str:
    """``path`` as seen under ``root_path``: unchanged when it already carries the prefix."""
    if not root_path or path == root_path or path.startswith(root_path + "/"):
        return path
    return root_path + path


class RootPathMiddleware:
    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = normalize_root_path(root_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = self.root_path
        if not root or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == root and scope["type"] == "http":
            query = scope.get("query_string", b"")
            location = root + "/" + (("?" + query.decode("latin-1")) if query else "")
            await send(
                {
                    "type": "http.response.start",
                    "status": 308,
                    "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        new_path = prefixed(path, root)
        scope = dict(scope, root_path=root, path=new_path)
        if new_path != path and "raw_path" in scope and scope["raw_path"] is not None:
            scope["raw_path"] = root.encode("ascii") + scope["raw_path"]
        await self.app(scope, receive, send)
