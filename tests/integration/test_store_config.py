"""The store's settings: where the state dir is by default, --state-dir, --no-state, retention and caps."""

from __future__ import annotations

import os

from pathlib import Path

import psutil

from gateway.config import Config, default_state_dir, store_state_dir
from gateway.store import EventStore
from support import alive


def test_default_state_dir_follows_xdg_state_home() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/var/lib/me"}) == "/var/lib/me/worker-gateway"


def test_default_state_dir_without_xdg_is_under_home() -> None:
    expected = os.path.join(os.path.expanduser("~"), ".local", "state", "worker-gateway")
    assert default_state_dir({}) == expected
    assert default_state_dir({"XDG_STATE_HOME": "relative/dir"}) == expected  # XDG: relative is ignored


def test_state_dir_flag_wins_and_no_state_turns_the_store_off() -> None:
    cfg = Config.load(["--state-dir", "/tmp/wg-state"], environ={"XDG_STATE_HOME": "/elsewhere"})
    assert store_state_dir(cfg, {"XDG_STATE_HOME": "/elsewhere"}) == "/tmp/wg-state"
    assert store_state_dir(Config.load([], environ={}), {"XDG_STATE_HOME": "/x"}) == "/x/worker-gateway"
    assert store_state_dir(Config.load(["--no-state"], environ={})) is None
    assert store_state_dir(Config.load([], environ={"WORKER_GATEWAY_NO_STATE": "1"})) is None


def test_store_knobs_parse_with_their_defaults() -> None:
    cfg = Config.load([], environ={})
    assert (cfg.retention_days, cfg.store_max_bytes, cfg.no_state) == (30.0, 1024 ** 3, False)
    assert cfg.detached_quota_bytes == 64 * 1024 * 1024
    cfg = Config.load(["--retention-days", "0.5", "--store-max-bytes", str(2 ** 21),
                       "--detached-quota-bytes", str(2 ** 20)], environ={})
    assert (cfg.retention_days, cfg.store_max_bytes, cfg.detached_quota_bytes) == (0.5, 2 ** 21, 2 ** 20)


async def test_from_config_opens_the_configured_dir_or_nothing(tmp_path: Path) -> None:
    assert await EventStore.from_config(Config(no_state=True), on_durable=lambda _s: None) is None
    store = await EventStore.from_config(Config(state_dir=str(tmp_path / "st"), retention_days=1.0),
                                         on_durable=lambda _s: None)
    assert store is not None
    writer = psutil.Process(store.writer_pid)
    try:
        assert store.state_dir == (tmp_path / "st").resolve() and store.path.exists()
    finally:
        await store.close()
    assert not alive([writer])
