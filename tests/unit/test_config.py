"""Config: one parser for flags and environment, malformed values fall back, ping policy by bind."""

from __future__ import annotations

import logging

import pytest

from gateway.config import Config, ConfigError, KNOBS, is_loopback_host, ping_policy


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("127.255.255.254", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("192.168.1.10", False),
    ("10.0.0.1", False), ("example.com", False), ("128.0.0.1", False), ("", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", (None, None)), ("127.8.9.10", (None, None)), ("::1", (None, None)),
    ("localhost", (None, None)), ("0.0.0.0", (20.0, 20.0)), ("::", (20.0, 20.0)),
    ("192.168.0.5", (20.0, 20.0)), ("gateway.example", (20.0, 20.0)),
])
def test_ping_policy_by_bind(host: str, expected: tuple) -> None:
    assert ping_policy(host) == expected
    assert Config(host=host).ws_ping_interval == expected[0]
    assert Config(host=host).ws_ping_timeout == expected[1]


def test_explicit_ping_wins_on_any_bind() -> None:
    assert ping_policy("127.0.0.1", 1.0, 1.0, explicit=True) == (1.0, 1.0)
    assert ping_policy("0.0.0.0", None, None, explicit=True) == (None, None)
    cfg = Config.load(["--ws-ping-interval", "1", "--ws-ping-timeout", "1"], environ={})
    assert (cfg.ws_ping_interval, cfg.ws_ping_timeout) == (1.0, 1.0)
    cfg = Config.load(["--host", "0.0.0.0", "--token", "t"],
                      environ={"WORKER_GATEWAY_WS_PING_INTERVAL": "none", "WORKER_GATEWAY_WS_PING_TIMEOUT": "none"})
    assert (cfg.ws_ping_interval, cfg.ws_ping_timeout) == (None, None)


def test_flags_win_over_environment() -> None:
    cfg = Config.load(["--port", "9000"], environ={"WORKER_GATEWAY_PORT": "9100", "WORKER_GATEWAY_AGENT": "shell"})
    assert cfg.port == 9000
    assert cfg.agent == "shell"


@pytest.mark.parametrize("name, raw", [
    ("WORKER_GATEWAY_PORT", "eighty"), ("WORKER_GATEWAY_PORT", "70000"), ("WORKER_GATEWAY_GRACE_S", "nan"),
    ("WORKER_GATEWAY_POOL_SIZE", "-1"), ("WORKER_GATEWAY_KILL_GRACE_S", ""), ("WORKER_GATEWAY_NO_AUTH", "maybe"),
])
def test_malformed_environment_falls_back_with_a_warning(name: str, raw: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="worker_gateway.config"):
        cfg = Config.load([], environ={name: raw})
    knob = next(k for k in KNOBS if k.env == name)
    assert getattr(cfg, knob.name) == knob.default
    assert name in caplog.text


def test_malformed_flag_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        Config.load(["--port", "nope"], environ={})
    assert exc.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_every_knob_is_a_config_field() -> None:
    fields = set(Config.__dataclass_fields__)
    assert {k.name for k in KNOBS} <= fields


def test_no_auth_refused_off_loopback() -> None:
    Config(host="127.0.0.1", no_auth=True).validate()
    with pytest.raises(ConfigError, match="--no-auth"):
        Config(host="0.0.0.0", no_auth=True).validate()


def test_token_generated_when_missing() -> None:
    a, b = Config().with_token(), Config().with_token()
    assert a.token and b.token and a.token != b.token
    assert a.token.startswith("wg_")  # never "-...", which a command line would read as a flag
    assert Config(token="given").with_token().token == "given"
    assert Config(no_auth=True).with_token().token is None


def test_log_level_is_validated() -> None:
    assert Config.load(["--log-level", "TRACE"], environ={}).log_level == "trace"
    with pytest.raises(SystemExit):
        Config.load(["--log-level", "loud"], environ={})
    assert Config.load([], environ={"WORKER_GATEWAY_LOG_LEVEL": "loud"}).log_level == "info"


def test_edge_knobs_parse_and_validate() -> None:
    cfg = Config.load(["--root-path", "gw/", "--forwarded-allow-ips", "10.0.0.0/8, 127.0.0.1"], environ={})
    cfg.validate()
    assert cfg.normalized_root_path == "/gw"
    assert cfg.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]
    assert Config(forwarded_allow_ips="none").trusted_proxies == []
    assert Config().trusted_proxies == ["127.0.0.1", "::1"] and Config().normalized_root_path == ""
    for bad in (dict(root_path="/a b"), dict(root_path="/x?y"), dict(forwarded_allow_ips="proxy.example")):
        with pytest.raises(ConfigError):
            Config(**bad).validate()
    env = Config.load([], environ={"WORKER_GATEWAY_HANDSHAKE_TIMEOUT_S": "2.5",
                                   "WORKER_GATEWAY_MAX_PENDING_CONNECTIONS": "nope"})
    assert env.handshake_timeout_s == 2.5 and env.max_pending_connections == 64  # malformed: the default
