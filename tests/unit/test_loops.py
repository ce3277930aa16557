"""Event-loop selection per platform."""

from __future__ import annotations

import asyncio

from gateway.loops import select_loop_factory


class WithFactory:
    def get_loop_factory(self):
        return asyncio.SelectorEventLoop


class WithoutFactory:
    pass


def test_uvicorn_factory_is_used_when_available() -> None:
    assert select_loop_factory(WithFactory(), platform="win32") is asyncio.SelectorEventLoop
    assert select_loop_factory(WithFactory(), platform="linux") is asyncio.SelectorEventLoop


def test_windows_falls_back_to_selector_loop_without_the_api() -> None:
    factory = select_loop_factory(WithoutFactory(), platform="win32")
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
    finally:
        loop.close()


def test_posix_keeps_the_default_loop_without_the_api() -> None:
    assert select_loop_factory(WithoutFactory(), platform="linux") is None
