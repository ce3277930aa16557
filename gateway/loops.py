"""Event-loop selection, isolated so it can be unit-tested with a patched platform."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def select_loop_factory(uvicorn_config: Any, platform: str | None = None) -> LoopFactory | None:
    """The loop uvicorn would pick (uvloop on POSIX when installed).  On win32 uvicorn's own factory is
    used when this uvicorn has ``Config.get_loop_factory``; older uvicorns lack it, and then the selector
    loop is used because the proactor loop's socket handling breaks with externally bound sockets."""
    platform = platform or sys.platform
    get_factory = getattr(uvicorn_config, "get_loop_factory", None)
    if get_factory is not None:
        return get_factory()
    if platform == "win32":
        policy = getattr(asyncio, "WindowsSelectorEventLoopPolicy", None)
        if policy is not None:
            return lambda: policy().new_event_loop()
        return asyncio.SelectorEventLoop
    return None
